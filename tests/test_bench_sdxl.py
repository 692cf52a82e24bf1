"""bench/sd_lora_step.py's SDXL mode on its tiny CPU model: the result it reports, the conditioning it feeds the
U-Net, its FLOP counts and its errors.

The full-size numbers need the GPU machine (bench/RESULTS.md, "SDXL — to be measured"); these tests keep the
`--model sdxl` path working: it is the tiny path with SDXL_UNET_CONFIG in place of the tiny config.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import sd_lora_step as sd_bench
from library.models.sd_unet import SdxlUNet
from sdxl_train_network import SdxlNetworkTrainer

TINY = ["--model", "tiny_sdxl", "--device", "cpu", "--warmup", "0", "--matmul_size", "0"]
RANK = 16


def _expected_lora_params(unet: torch.nn.Module) -> int:
    """sd-scripts' default U-Net targets: every Linear (and 1x1 conv) inside the transformer blocks, rank r,
    so r * (in + out) each; the ResBlocks' 3x3 convs only with conv_dim, which the bench does not set."""
    total = 0
    for container in unet.modules():
        if type(container).__name__ != "SpatialTransformer":
            continue
        for layer in container.modules():
            if isinstance(layer, torch.nn.Linear):
                total += RANK * (layer.in_features + layer.out_features)
            elif isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1):
                total += RANK * (layer.in_channels + layer.out_channels)
    return total


def _size_embedding(values: list[float], dim: int = 256) -> torch.Tensor:
    """sgm's timestep-style embedding of each size value, written out: cos half first, periods up to 10000."""
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = torch.tensor(values, dtype=torch.float64)[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).flatten()


def test_tiny_sdxl_cpu_run_reports_a_complete_result(tmp_path):
    lines: list[str] = []
    json_out = tmp_path / "results.jsonl"
    result = sd_bench.run(sd_bench.parse_args([*TINY, "--steps", "1", "--json_out", str(json_out)]), report=lines.append)

    unet = SdxlUNet(sd_bench.MODELS["tiny_sdxl"].config)
    assert (result["model"], result["resolution"], result["batch_size"], result["network_dim"]) == ("tiny_sdxl", 64, 1, 16)
    assert result["gradient_checkpointing"] and result["lora_dtype"] == "fp32"
    assert result["unet_params"] == sum(p.numel() for p in unet.parameters())
    assert result["lora_params"] == _expected_lora_params(unet)
    assert result["steps_timed"] == 1 and result["s_per_step_median"] > 0
    assert result["tflop_per_step"] * 1e12 == pytest.approx(sum(result["flops_by_op"].values()), rel=1e-12)
    counted: list[str] = []
    flops_only = sd_bench.run(sd_bench.parse_args([*TINY, "--flops_only"]), report=counted.append)
    assert flops_only["model_tflop_per_step"] == result["model_tflop_per_step"]
    # Checkpointing (on by default) runs most of the forward twice: the executed and recompute counts exceed the model's.
    assert result["tflop_per_step"] > result["model_tflop_per_step"] > 0
    assert flops_only["recompute_tflop_per_step"] > flops_only["model_tflop_per_step"]
    assert "meta-device count" in counted[0]
    assert "mfu" not in result and "peak_allocated_gib" not in result, "GPU-only fields stay out of a CPU result"

    printed = [json.loads(line.removeprefix("RESULT ")) for line in lines if line.startswith("RESULT ")]
    assert printed == [result]
    assert [json.loads(line) for line in json_out.read_text().splitlines()] == [result]


def test_the_step_goes_through_the_sdxl_trainer_with_pooled_text_and_uncropped_size_conditioning():
    """What reaches label_emb is y = [pooled, emb(64), emb(64), emb(0), emb(0), emb(64), emb(64)] for a 64² image:
    original size, crop top-left and target size, computed here from the formula, not by the library."""
    bench = sd_bench.build(sd_bench.parse_args([*TINY, "--batch_size", "2"]))
    assert isinstance(bench.trainer, SdxlNetworkTrainer)
    assert not bench.trainer.loss_config.v_parameterization, "SDXL base trains epsilon prediction"
    seen: dict[str, torch.Tensor] = {}
    unet = bench.models.denoiser

    def keep(name: str, position: int):
        def hook(_: torch.nn.Module, args: tuple) -> None:
            # The first call's input: checkpointing calls the blocks again in backward.
            seen.setdefault(name, args[position].detach().clone())
        return hook

    unet.label_emb.register_forward_pre_hook(keep("y", 0))
    unet.input_blocks[3].register_forward_pre_hook(keep("context", 2))
    loss = sd_bench.train_step(bench)

    assert math.isfinite(loss) and loss > 0
    sizes = _size_embedding([64, 64, 0, 0, 64, 64])
    expected_y = torch.cat([bench.text["pooled"].double(), sizes.expand(2, -1)], dim=1)
    assert seen["y"].dtype == torch.bfloat16 and seen["y"].shape == (2, unet.config.adm_in_channels)
    torch.testing.assert_close(seen["y"].double(), expected_y, rtol=8e-3, atol=4e-3)
    torch.testing.assert_close(seen["context"].double(), bench.text["hidden_states"].double(), rtol=8e-3, atol=0)


def test_same_seed_gives_the_same_losses_and_each_step_draws_new_noise():
    first, second = (sd_bench.build(sd_bench.parse_args(TINY)) for _ in range(2))
    losses = [[sd_bench.train_step(bench) for _ in range(3)] for bench in (first, second)]
    assert losses[0] == losses[1]
    assert len(set(losses[0])) == 3


@pytest.mark.parametrize("model", ["sdxl", "tiny_sdxl"])
def test_cached_pooled_width_fills_the_unets_vector_conditioning(model):
    """label_emb takes the pooled embedding followed by six 256-wide size embeddings (SDXL: 1280 + 1536 = 2816)."""
    spec = sd_bench.MODELS[model]
    assert spec.pooled_dim + 6 * 256 == spec.config.adm_in_channels
    assert spec.context_dim == spec.config.context_dim
    options = sd_bench.parse_args(["--model", model])
    latents, text, extra = sd_bench.cached_inputs(options)
    side = spec.resolution // 8
    assert latents.shape == (1, 4, side, side) and text["pooled"].shape == (1, spec.pooled_dim)
    assert text["hidden_states"].shape == (1, 77, spec.context_dim)
    assert extra["original_sizes_hw"].tolist() == extra["target_sizes_hw"].tolist() == [[spec.resolution] * 2]
    assert extra["crop_top_lefts"].tolist() == [[0, 0]]


def test_checkpoint_recompute_adds_one_forward_of_every_block_that_backward_reaches():
    """Blocks before the first LoRA (conv_in, the level-0 ResBlock, the first Downsample) carry no gradient, so
    checkpointing never reruns them; every later block runs its forward once more. torch's non-reentrant
    checkpoint stops a rerun once the tensors backward needs are back (early stop, the default the trainer
    runs), so the count it really executes is somewhat lower than that full second forward."""
    options = sd_bench.parse_args(TINY)
    unet, inputs = sd_bench.meta_model(options)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*inputs)
    per_module = counter.get_flop_counts()
    names = [f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
    names += [f"output_blocks.{i}" for i in range(len(unet.output_blocks))]
    first_lora = next(i for i, name in enumerate(names)
                      if any(type(m).__name__ == "SpatialTransformer" for m in unet.get_submodule(name).modules()))
    assert names[first_lora] == "input_blocks.3"
    reached = sum(sum(per_module[f"SdxlUNet.{name}"].values()) for name in names[first_lora:])

    plain = sd_bench.meta_flops(options, recompute=False)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        assert sd_bench.meta_flops(options, recompute=True) - plain == reached
    early_stopped = sd_bench.meta_flops(options, recompute=True) - plain
    assert 0.8 * reached < early_stopped < reached


def test_a_resolution_the_vae_cannot_make_is_refused():
    with pytest.raises(ValueError, match="--resolution 1020 is not a multiple of 8"):
        sd_bench.run(sd_bench.parse_args([*TINY, "--resolution", "1020"]), report=lambda _: None)


def test_launch_count_runs_the_narrow_stand_in_of_the_chosen_unet():
    """--count_launches keeps the U-Net's levels and transformer depths and narrows only widths (SDXL's vector y
    keeps its six size embeddings); one attention per transformer block in the forward."""
    result = sd_bench.run(sd_bench.parse_args(["--model", "tiny_sdxl", "--count_launches"]), report=lambda _: None)
    narrow = sd_bench.narrow(sd_bench.MODELS["tiny_sdxl"])
    original = sd_bench.MODELS["tiny_sdxl"].config
    assert narrow.config.transformer_depth == original.transformer_depth and narrow.config.model_channels == 32
    assert narrow.config.adm_in_channels - narrow.pooled_dim == original.adm_in_channels - sd_bench.MODELS["tiny_sdxl"].pooled_dim
    transformer_blocks = sum(1 for module in SdxlUNet(narrow.config).modules() if type(module).__name__ == "BasicTransformerBlock")
    assert result["launches_by_kind"]["forward"]["attention"] == 2 * transformer_blocks  # self- and cross-attention
    assert result["launches_per_step"] == sum(result["launches_by_phase"].values())


def test_torch_compile_compiles_the_unet_blocks_after_the_eager_flop_count(monkeypatch):
    """--torch_compile hands the U-Net's blocks to the compiler once the FLOPs were counted eagerly (compiled
    kernels would escape the counter); the result records the backend."""
    events: list[str] = []
    monkeypatch.setattr(sd_bench, "count_flops", lambda run: (events.append("flops"), run(), (1, {"mm": 1}))[-1])
    monkeypatch.setattr(sd_bench, "compile_blocks", lambda blocks, backend: events.append(f"compile {len(blocks)} {backend}"))
    result = sd_bench.run(sd_bench.parse_args([*TINY, "--steps", "1", "--torch_compile", "--dynamo_backend", "aot_eager"]),
                          report=lambda _: None)
    blocks = len(SdxlUNet(sd_bench.MODELS["tiny_sdxl"].config).blocks)
    assert events[:2] == ["flops", f"compile {blocks} aot_eager"] and result["torch_compile"] == "aot_eager"
