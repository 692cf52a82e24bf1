"""train_network.py with a record of what each rank did, for tests/test_distributed.py.

Launched by `accelerate launch` exactly like train_network.py and takes the same flags. Besides training,
every rank writes into --output_dir:
  rank{N}.safetensors  its own unwrapped LoRA parameters after the last step;
  rank{N}.json         the image keys of every training batch it drew, the learning rate after every
                       optimizer step, and the LoRA files and sample images it wrote itself.
DDP is correct when the parameter files are equal, the key lists are disjoint and only rank 0 wrote files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args import parse_args  # noqa: E402  (needs the repository root on sys.path first)
from library.console import setup_logging  # noqa: E402
from train_network import SdNetworkTrainer, setup_parser  # noqa: E402


class RecordingTrainer(SdNetworkTrainer):
    """SdNetworkTrainer that notes what its rank trained on and wrote."""

    def __init__(self, args):
        super().__init__(args)
        self.record: dict[str, list] = {"batches": [], "lrs": [], "saved": [], "samples": []}

    def _step_loss(self, ctx, batch, step, validation=False):
        if not validation:
            self.record["batches"].append(list(batch["keys"]))
        return super()._step_loss(ctx, batch, step, validation)

    def _after_step(self, ctx):
        self.record["lrs"].append(ctx.scheduler.get_last_lr()[0])
        super()._after_step(ctx)

    def _save_lora(self, ctx, file_name, **options):
        path = super()._save_lora(ctx, file_name, **options)
        self.record["saved"].append(path.name)
        return path

    def sample_images(self, models, sample, *, step, epoch, device):
        paths = super().sample_images(models, sample, step=step, epoch=epoch, device=device)
        self.record["samples"] += [Path(p).name for p in paths]
        return paths

    def _finish(self, ctx):
        accelerator = ctx.accelerator
        rank = accelerator.process_index
        network = accelerator.unwrap_model(ctx.network)
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
        save_file(weights, str(ctx.save.output_dir / f"rank{rank}.safetensors"))
        path = super()._finish(ctx)
        record = dict(self.record, num_processes=accelerator.num_processes, global_step=ctx.state.global_step)
        (ctx.save.output_dir / f"rank{rank}.json").write_text(json.dumps(record))
        return path


def main() -> None:
    args = parse_args(setup_parser(), sys.argv[1:])
    setup_logging(args)
    RecordingTrainer(args).train(args)


if __name__ == "__main__":
    main()
