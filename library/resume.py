"""--resume: continue a run from a state folder, ours or one that sd-scripts' LoRA trainers saved.

Both tools write accelerate's ``save_state`` files: ``model.safetensors`` (the LoRA network's state dict: sd-scripts'
save hook drops every other model, so its keys are the LoRA module names, as ours), ``optimizer.bin``,
``scheduler.bin``, ``random_states_<rank>.pkl``. Ours add ``train_state.json`` with ``epoch``, ``global_step`` and
``seed``, and accelerate loads everything back. sd-scripts' ``train_state.json`` holds ``current_epoch`` and
``current_step`` (optimizer steps done). From such a folder we take:

- the LoRA weights: this run's network must have exactly the folder's tensors, with the same shapes;
- the step: the epoch follows from it and the steps per epoch, as sd-scripts resumes;
- the optimizer's per-parameter state, when it fits. ``optimizer.bin`` numbers the parameters in the order
  sd-scripts' network hands them to its optimizer, which ``sd_scripts_param_order`` rebuilds from the module names;
  the optimizer must keep the same state entries as this run's type, and every tensor must fit its parameter.
  Otherwise the optimizer starts fresh and a warning says why.

The learning-rate schedule is replayed from the flags up to the step instead of reading ``scheduler.bin`` (the
scheduler holds nothing else, and sd-scripts' groups may differ from ours), and the random states are not read:
every step here reseeds from the run's seed and the step.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from library.optim import OptimizerConfig, build_optimizer, set_train_mode
from library.train_state import STATE_FILE, TrainState, resolve_resume_folder

logger = logging.getLogger(__name__)

SD_SCRIPTS_STEP = "current_step"
NETWORK_FILES = ("model.safetensors", "pytorch_model.bin")  # accelerate's names, with or without safe_serialization
OPTIMIZER_FILE = "optimizer.bin"
SCALER_FILE = "scaler.pt"
# Optimizer param-group entries that this run's flags and replayed schedule own, never the saved state.
_OWN_GROUP_KEYS = frozenset({"params", "lr", "initial_lr", "param_names"})


@dataclass(frozen=True)
class ResumePoint:
    """A --resume folder, read before any model loads: where the run stands and who wrote the folder."""

    folder: Path
    state: TrainState  # from sd-scripts: the epoch is filled in by restore(), once steps per epoch are known
    from_sd_scripts: bool


def read_resume_point(resume: str) -> ResumePoint:
    """The folder's progress; one-line errors for a folder that is not a state folder of either tool."""
    folder = resolve_resume_folder(resume)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        if any((folder / name).is_file() for name in NETWORK_FILES):
            raise ValueError(f"--resume {resume}: no {STATE_FILE}, so the step it stopped at is unknown (an sd-scripts "
                             f"state folder from before it wrote one?); start from its weights instead: --network_weights "
                             f"{folder / NETWORK_FILES[0]} --initial_step N")
        raise FileNotFoundError(f"--resume {resume}: no {STATE_FILE} inside; is this a state folder saved with "
                                "--save_state?")
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
        if SD_SCRIPTS_STEP in data and "global_step" not in data:
            return ResumePoint(folder, TrainState(global_step=int(data[SD_SCRIPTS_STEP])), from_sd_scripts=True)
        return ResumePoint(folder, TrainState.read(folder), from_sd_scripts=False)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume {resume}: {STATE_FILE} is not a train state ({type(error).__name__}: {error})") from None


def restore(point: ResumePoint, accelerator: Accelerator, network: Any, optimizer: Any, *, steps_per_epoch: int,
            seed: int, optimizer_config: OptimizerConfig) -> TrainState:
    """Load the folder into the prepared network and optimizer (and ours: scheduler and random states too);
    returns where the run continues."""
    if not point.from_sd_scripts:
        accelerator.load_state(str(point.folder))
        return point.state
    step = point.state.global_step
    load_network_weights(point.folder, accelerator.unwrap_model(network))
    problem = load_sd_scripts_optimizer(point.folder, optimizer, accelerator.unwrap_model(network), optimizer_config)
    if problem:
        logger.warning("--resume %s: the optimizer starts fresh (LoRA weights and step are taken): %s",
                       point.folder, problem)
    scaler = point.folder / SCALER_FILE
    if accelerator.scaler is not None and scaler.is_file():
        accelerator.scaler.load_state_dict(torch.load(scaler, map_location="cpu", weights_only=True))
    logger.info("--resume %s: an sd-scripts state at step %d; the learning-rate schedule is replayed from the flags",
                point.folder, step)
    return TrainState(epoch=step // steps_per_epoch, global_step=step, seed=seed)


# ---------------------------------------------------------------------------------------------- weights
def load_network_weights(folder: Path, network: nn.Module) -> None:
    """The folder's LoRA tensors into ``network``, which must have the same tensors with the same shapes."""
    saved = _read_network_file(folder)
    ours = network.state_dict()
    missing, extra = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
    if missing or extra:
        raise ValueError(
            f"--resume {folder}: its LoRA does not fit this run's network ({len(missing)} of this run's tensors missing, "
            f"e.g. {missing[:2]}; {len(extra)} others, e.g. {extra[:2]}); resume with the network flags of the run that "
            "saved it (--network_module, --network_args, --network_train_unet_only / --network_train_text_encoder_only)")
    misfits = [key for key in ours if ours[key].shape != saved[key].shape]
    if misfits:
        key = misfits[0]
        raise ValueError(f"--resume {folder}: {key} is {tuple(saved[key].shape)} in the state but {tuple(ours[key].shape)} "
                         f"in this run ({len(misfits)} tensors differ); resume with the --network_dim / conv_dim it was saved with")
    network.load_state_dict(saved, strict=True)


def _read_network_file(folder: Path) -> dict[str, Tensor]:
    for name in NETWORK_FILES:
        path = folder / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"--resume {folder}: no LoRA weights inside (expected {' or '.join(NETWORK_FILES)})")


# ---------------------------------------------------------------------------------------------- optimizer
def load_sd_scripts_optimizer(folder: Path, optimizer: Any, network: nn.Module, config: OptimizerConfig) -> str:
    """Load sd-scripts' ``optimizer.bin`` into this run's optimizer, parameter by parameter, by module name.

    Returns why it was not loaded ("" when it was)."""
    from networks.lora import LoRANetwork

    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        return f"no {OPTIMIZER_FILE} in the folder"
    if not isinstance(network, LoRANetwork):
        return "the parameter order of a --network_module other than networks.lora (networks.lora_sd3) is not known"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle of objects beyond tensors and numbers: not an optimizer we build
        return f"{OPTIMIZER_FILE} is unreadable as plain tensors ({type(error).__name__})"
    if not isinstance(saved, dict) or not {"state", "param_groups"} <= saved.keys():
        return f"{OPTIMIZER_FILE} is not a torch optimizer state (a DeepSpeed run?)"
    names = {id(param): name for name, param in network.named_parameters()}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    order = sd_scripts_param_order(network, {names[id(param)] for param in params})
    saved_index = [index for group in saved["param_groups"] for index in group["params"]]
    if len(saved_index) != len(params):
        return f"it holds {len(saved_index)} parameters, this run trains {len(params)}"
    position = {name: k for k, name in enumerate(order)}
    state: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(params):
        entry = saved["state"].get(saved_index[position[names[id(param)]]])
        if entry is not None:
            problem = _misfit(entry, param)
            if problem:
                return f"{names[id(param)]}: {problem}"
            state[index] = entry
    if state:
        index, entry = next(iter(state.items()))
        expected = _fresh_state_keys(config, params[index])
        if expected is None:
            return f"could not check that it was written by --optimizer_type {config.optimizer_type or 'AdamW'}"
        if set(entry) != expected:
            return (f"it was written by another optimizer (state {sorted(entry)}, --optimizer_type "
                    f"{config.optimizer_type or 'AdamW'} keeps {sorted(expected)})")
    groups = _param_groups(optimizer.state_dict()["param_groups"], saved["param_groups"], saved_index,
                           [position[names[id(param)]] for param in params])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as error:  # torch's own checks of the mapped state
        return f"{OPTIMIZER_FILE} does not load ({error})"
    logger.info("--resume %s: optimizer state of %d parameters taken from sd-scripts' %s", folder, len(state), OPTIMIZER_FILE)
    return ""


def _misfit(entry: dict[str, Any], param: Tensor) -> str:
    """Why a saved per-parameter state cannot belong to ``param`` ("" when it can): a state tensor with as many
    dimensions as the (matrix or conv) parameter must have its shape. Factored (Adafactor) and quantization
    (8-bit) side tensors have fewer dimensions and are not compared."""
    for key, value in entry.items():
        if isinstance(value, Tensor) and param.dim() >= 2 and value.dim() == param.dim() and value.shape != param.shape:
            return f"state {key} is {tuple(value.shape)}, the parameter {tuple(param.shape)}"
    return ""


def _fresh_state_keys(config: OptimizerConfig, like: Tensor) -> set[str] | None:
    """The state entries this run's optimizer keeps for a parameter shaped like ``like`` (one step on a copy)."""
    probe_param = nn.Parameter(torch.zeros_like(like))
    try:
        _, probe = build_optimizer(config, [probe_param])
        set_train_mode(probe, True)
        probe_param.grad = torch.zeros_like(probe_param)
        probe.step()
    except Exception as error:  # an optimizer that refuses a zero gradient cannot be checked this way
        logger.debug("optimizer probe failed: %s", error)
        return None
    return set(probe.state.get(probe_param, {})) or None


def _param_groups(ours: list[dict], saved: list[dict], saved_index: Sequence[int], positions: Sequence[int]) -> list[dict]:
    """Our groups (our parameters, learning rates and their split), with the values the optimizer adapts while it
    runs (Prodigy's d, ...) from the saved group that held each group's parameters."""
    group_of = {index: group for group in saved for index in group["params"]}
    merged, start = [], 0
    for group in ours:
        count = len(group["params"])
        source = group_of[saved_index[positions[start]]] if count else {}
        merged.append(group | {key: value for key, value in source.items() if key in group and key not in _OWN_GROUP_KEYS})
        start += count
    return merged


# ---------------------------------------------------------------------------------------------- sd-scripts' order
_SD_UNET_PART = re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_(?:(\d+)_)?(attentions|resnets|downsamplers|upsamplers)_(\d+)_")
_SD_SECTION_RANK = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
_SD_KIND_RANK = {"attentions": 0, "resnets": 1, "downsamplers": 2, "upsamplers": 2}


def sd_scripts_param_order(network: Any, trained: set[str]) -> list[str]:
    """The names of the ``trained`` parameters in the order sd-scripts' network hands them to its optimizer.

    sd-scripts builds its groups as ours do: text-encoder part(s), then the denoiser (one group per block with
    block-wise learning rates, blocks in the order their modules come), each split into lora_down weights and a LoRA+
    "plus" group of lora_up weights when a ratio is set. Two differences: its SD/SDXL network (lora.py) puts all text
    encoders in one part where we give each its own (its SD3 network, like ours, one per encoder: SD3's three), and
    its SD1/SD2 U-Net runs its modules in another order (``sd_scripts_unet_order``).
    """
    te_groups = [list(group) for group in network.text_encoder_groups]
    te_parts = te_groups if len(te_groups) == 3 else [[lora for group in te_groups for lora in group]]
    unet = sd_scripts_unet_order(network.unet_loras)
    block_lrs = network.unet_block_lrs() if hasattr(network, "unet_block_lrs") else None
    if block_lrs is None:
        unet_parts = [unet]
    else:
        block_of = network.unet_block_of
        blocks = list(dict.fromkeys(block_of.get(lora.lora_name) for lora in unet))
        unet_parts = [[lora for lora in unet if block_of.get(lora.lora_name) == block] for block in blocks]
    te_plus = (network.loraplus_text_encoder_lr_ratio or network.loraplus_lr_ratio) is not None
    unet_plus = (network.loraplus_unet_lr_ratio or network.loraplus_lr_ratio) is not None
    order: list[str] = []
    for parts, plus in ((te_parts, te_plus), (unet_parts, unet_plus)):
        for part in parts:
            order += _part_order(part, plus)
    return [name for name in order if name in trained]


def _part_order(loras: Iterable[Any], plus: bool) -> list[str]:
    names = [f"{lora.lora_name}.{name}" for lora in loras for name, _ in lora.named_parameters()]
    if not plus:
        return names
    return [name for name in names if "lora_up" not in name] + [name for name in names if "lora_up" in name]


def sd_scripts_unet_order(loras: Sequence[Any]) -> list[Any]:
    """Denoiser LoRA modules in sd-scripts' module order.

    sd-scripts trains SD1/SD2 on a U-Net in diffusers' layout, whose modules run down_blocks, up_blocks, then
    mid_block, and in each block its attentions, then its resnets, then its down/upsampler. Our ldm U-Net interleaves
    resnets and attentions and has the middle block between the two halves. SDXL's and SD3's modules (and the text
    encoders') come in the same order in both tools.
    """
    keys = [_sd_unet_position(lora.lora_name) for lora in loras]
    if not loras or any(key is None for key in keys):
        return list(loras)
    ranked = sorted(range(len(loras)), key=lambda i: (keys[i], i))
    return [loras[i] for i in ranked]


def _sd_unet_position(lora_name: str) -> tuple[int, int, int, int] | None:
    match = _SD_UNET_PART.match(lora_name)
    if match is None:
        return None
    section, block, kind, index = match.groups()
    return _SD_SECTION_RANK[section], int(block or 0), _SD_KIND_RANK[kind], int(index)

