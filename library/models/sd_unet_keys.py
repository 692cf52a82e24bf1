"""The one reversible adapter between ldm/sgm and diffusers names of the SD U-Net (SD1, SD2, SDXL).

sd-scripts trains SD1/SD2 on a diffusers-named U-Net, so its LoRA files name U-Net modules by diffusers
paths (``lora_unet_down_blocks_0_attentions_0_...``) while our model and the single-file checkpoints use
ldm paths (``input_blocks.1.1....``). SDXL LoRA files keep the sgm paths, so for SDXL this adapter only
renames diffusers ``unet/`` folders on loading. Both functions accept parameter keys (``...conv1.weight``) and module
paths (``...conv1``), without any ``model.diffusion_model.`` / ``unet.`` prefix. A name with no
counterpart (a container such as ``input_blocks.1``, an activation such as ``in_layers.1``) raises
ValueError.

ldm numbers the blocks of the two U-Net halves flat; diffusers groups them per resolution level:
``input_blocks.K`` (K >= 1) is layer ``(K-1) % (n+1)`` of down block ``(K-1) // (n+1)``, where the last
layer of each level but the deepest is the downsampler; ``output_blocks.K`` is layer ``K % (n+1)`` of up
block ``K // (n+1)``, and up block b is ldm level ``levels-1-b``. Here n = num_res_blocks.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from library.models.sd_unet import SdUNetConfig

_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_LEVEL_INV = {v: k for k, v in _TOP_LEVEL.items()}
# Only U-Nets with adm_in_channels (SDXL's pooled-text + size vector) have these.
_LABEL_EMB = {
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
_LABEL_EMB_INV = {v: k for k, v in _LABEL_EMB.items()}

# ResBlock internals: ldm Sequential indices -> diffusers ResnetBlock2D attributes.
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_INV = {v: k for k, v in _RESNET.items()}

_MID_LDM_TO_DIFFUSERS = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MID_DIFFUSERS_TO_LDM = {v: k for k, v in _MID_LDM_TO_DIFFUSERS.items()}

_PARAM_SUFFIXES = ("weight", "bias")
_TRANSFORMER_CHILDREN = ("norm", "proj_in", "transformer_blocks", "proj_out")


def ldm_to_diffusers_unet_key(key: str, config: SdUNetConfig) -> str:
    """``input_blocks.1.0.in_layers.2.weight`` -> ``down_blocks.0.resnets.0.conv1.weight``."""
    path, suffix = _split_suffix(key)
    return _join(_ldm_path_to_diffusers(path, key, config), suffix)


def diffusers_to_ldm_unet_key(key: str, config: SdUNetConfig) -> str:
    """``down_blocks.0.resnets.0.conv1.weight`` -> ``input_blocks.1.0.in_layers.2.weight``."""
    path, suffix = _split_suffix(key)
    return _join(_diffusers_path_to_ldm(path, key, config), suffix)


def unet_state_dict_from_diffusers(sd: Mapping[str, Tensor], config: SdUNetConfig) -> dict[str, Tensor]:
    """A diffusers ``unet/`` state dict renamed to the ldm layout our SdUNet loads (no tensor changes)."""
    return {diffusers_to_ldm_unet_key(key, config): value for key, value in sd.items()}


def _split_suffix(key: str) -> tuple[str, str]:
    head, _, last = key.rpartition(".")
    if last in _PARAM_SUFFIXES and head:
        return head, last
    return key, ""


def _join(path: str, suffix: str) -> str:
    return f"{path}.{suffix}" if suffix else path


def _unmapped(key: str) -> ValueError:
    return ValueError(f"U-Net key '{key}' has no ldm <-> diffusers counterpart (is it a parameter or module path?)")


def _ldm_path_to_diffusers(path: str, key: str, config: SdUNetConfig) -> str:
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    if path in _LABEL_EMB and config.adm_in_channels is not None:
        return _LABEL_EMB[path]
    parts = path.split(".")
    if len(parts) < 2 or not parts[1].isdigit():
        raise _unmapped(key)
    index, rest = int(parts[1]), parts[2:]
    if parts[0] == "input_blocks" and index > 0:
        return _ldm_input_block(index, rest, key, config)
    if parts[0] == "middle_block" and parts[1] in _MID_LDM_TO_DIFFUSERS:
        inner = _MID_LDM_TO_DIFFUSERS[parts[1]]
        if inner.startswith("resnets"):
            return f"mid_block.{inner}" + _ldm_resnet_inner(rest, key)
        return f"mid_block.{inner}" + _transformer_inner(rest, key)
    if parts[0] == "output_blocks":
        return _ldm_output_block(index, rest, key, config)
    raise _unmapped(key)


def _ldm_input_block(index: int, rest: list[str], key: str, config: SdUNetConfig) -> str:
    level, layer = divmod(index - 1, config.num_res_blocks + 1)
    if level >= len(config.channel_mult) or not rest:
        raise _unmapped(key)
    prefix = f"down_blocks.{level}"
    if layer == config.num_res_blocks:
        is_deepest = level == len(config.channel_mult) - 1
        if is_deepest or rest[0] != "0" or rest[1:] not in ([], ["op"]):
            raise _unmapped(key)
        return f"{prefix}.downsamplers.0" + (".conv" if rest[1:] else "")
    if rest[0] == "0":
        return f"{prefix}.resnets.{layer}" + _ldm_resnet_inner(rest[1:], key)
    if rest[0] == "1" and level in config.attention_levels:
        return f"{prefix}.attentions.{layer}" + _transformer_inner(rest[1:], key)
    raise _unmapped(key)


def _ldm_output_block(index: int, rest: list[str], key: str, config: SdUNetConfig) -> str:
    num_levels = len(config.channel_mult)
    up_block, layer = divmod(index, config.num_res_blocks + 1)
    if up_block >= num_levels or not rest:
        raise _unmapped(key)
    has_attention = (num_levels - 1 - up_block) in config.attention_levels
    has_upsampler = layer == config.num_res_blocks and up_block != num_levels - 1
    upsampler_slot = "2" if has_attention else "1"
    prefix = f"up_blocks.{up_block}"
    if rest[0] == "0":
        return f"{prefix}.resnets.{layer}" + _ldm_resnet_inner(rest[1:], key)
    if has_upsampler and rest[0] == upsampler_slot:
        if rest[1:] not in ([], ["conv"]):
            raise _unmapped(key)
        return f"{prefix}.upsamplers.0" + (".conv" if rest[1:] else "")
    if has_attention and rest[0] == "1":
        return f"{prefix}.attentions.{layer}" + _transformer_inner(rest[1:], key)
    raise _unmapped(key)


def _ldm_resnet_inner(rest: list[str], key: str) -> str:
    """Path inside a ResBlock: ldm Sequential indices become diffusers attribute names."""
    if not rest:
        return ""
    name = ".".join(rest)
    if name not in _RESNET:
        raise _unmapped(key)
    return "." + _RESNET[name]


def _diffusers_path_to_ldm(path: str, key: str, config: SdUNetConfig) -> str:
    if path in _TOP_LEVEL_INV:
        return _TOP_LEVEL_INV[path]
    if path in _LABEL_EMB_INV and config.adm_in_channels is not None:
        return _LABEL_EMB_INV[path]
    parts = path.split(".")
    if parts[0] == "mid_block" and ".".join(parts[1:3]) in _MID_DIFFUSERS_TO_LDM:
        inner = ".".join(parts[1:3])
        if parts[1] == "resnets":
            return f"middle_block.{_MID_DIFFUSERS_TO_LDM[inner]}" + _diffusers_resnet_inner(parts[3:], key)
        return f"middle_block.{_MID_DIFFUSERS_TO_LDM[inner]}" + _transformer_inner(parts[3:], key)
    if len(parts) < 4 or parts[0] not in ("down_blocks", "up_blocks"):
        raise _unmapped(key)
    if not (parts[1].isdigit() and parts[3].isdigit()):
        raise _unmapped(key)
    block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if block >= len(config.channel_mult):
        raise _unmapped(key)
    if parts[0] == "down_blocks":
        return _diffusers_down_block(block, kind, layer, rest, key, config)
    return _diffusers_up_block(block, kind, layer, rest, key, config)


def _diffusers_down_block(block: int, kind: str, layer: int, rest: list[str], key: str, config: SdUNetConfig) -> str:
    base = 1 + block * (config.num_res_blocks + 1)
    if kind == "downsamplers" and layer == 0 and block < len(config.channel_mult) - 1 and rest in ([], ["conv"]):
        return f"input_blocks.{base + config.num_res_blocks}.0" + (".op" if rest else "")
    if layer >= config.num_res_blocks:
        raise _unmapped(key)
    if kind == "resnets":
        return f"input_blocks.{base + layer}.0" + _diffusers_resnet_inner(rest, key)
    if kind == "attentions" and block in config.attention_levels:
        return f"input_blocks.{base + layer}.1" + _transformer_inner(rest, key)
    raise _unmapped(key)


def _diffusers_up_block(block: int, kind: str, layer: int, rest: list[str], key: str, config: SdUNetConfig) -> str:
    num_levels = len(config.channel_mult)
    has_attention = (num_levels - 1 - block) in config.attention_levels
    base = block * (config.num_res_blocks + 1)
    if kind == "upsamplers" and layer == 0 and block < num_levels - 1 and rest in ([], ["conv"]):
        slot = 2 if has_attention else 1
        return f"output_blocks.{base + config.num_res_blocks}.{slot}" + (".conv" if rest else "")
    if layer > config.num_res_blocks:
        raise _unmapped(key)
    if kind == "resnets":
        return f"output_blocks.{base + layer}.0" + _diffusers_resnet_inner(rest, key)
    if kind == "attentions" and has_attention:
        return f"output_blocks.{base + layer}.1" + _transformer_inner(rest, key)
    raise _unmapped(key)


def _diffusers_resnet_inner(rest: list[str], key: str) -> str:
    if not rest:
        return ""
    if len(rest) == 1 and rest[0] in _RESNET_INV:
        return "." + _RESNET_INV[rest[0]]
    raise _unmapped(key)


def _transformer_inner(rest: list[str], key: str) -> str:
    """SpatialTransformer internals carry the same names in both layouts."""
    if not rest:
        return ""
    if rest[0] not in _TRANSFORMER_CHILDREN:
        raise _unmapped(key)
    return "." + ".".join(rest)
