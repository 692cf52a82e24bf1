"""Renaming a diffusers ``vae/`` state dict to the ldm layout our AutoencoderKL loads.

Diffusers groups the same layers differently: ``encoder.down_blocks.i.resnets.j`` is ldm
``encoder.down.i.block.j``; decoder ``up_blocks.i`` counts from the deepest level, so it is ldm
``decoder.up.{levels-1-i}``; the mid-block attention uses Linear q/k/v/out (older diffusers releases
named them query/key/value/proj_attn) where ldm stores 1x1 convs.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from library.models.vae import VaeConfig

_FIXED = {
    "conv_norm_out": "norm_out",
    "mid_block.attentions.0": "mid.attn_1",
    "mid_block.resnets.0": "mid.block_1",
    "mid_block.resnets.1": "mid.block_2",
}

_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}


def diffusers_to_ldm_vae_key(key: str, config: VaeConfig) -> str:
    """``decoder.up_blocks.0.resnets.1.conv_shortcut.weight`` -> ``decoder.up.3.block.1.nin_shortcut.weight``."""
    half, _, rest = key.partition(".")
    if half not in ("encoder", "decoder"):
        return key  # quant_conv / post_quant_conv keep their names
    for old, new in _FIXED.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    parts = rest.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3:
        level = int(parts[1])
        if parts[0] == "up_blocks":
            level = len(config.ch_mult) - 1 - level
        ldm_level = f"{'down' if parts[0] == 'down_blocks' else 'up'}.{level}"
        if parts[2] == "resnets":
            parts = [ldm_level, "block", *parts[3:]]
        elif parts[2] in ("downsamplers", "upsamplers"):
            parts = [ldm_level, parts[2][:-2], *parts[4:]]  # downsamplers.0 -> downsample
        rest = ".".join(parts)
    if rest.startswith("mid.attn_1."):
        name, _, suffix = rest[len("mid.attn_1.") :].rpartition(".")
        rest = f"mid.attn_1.{_ATTENTION.get(name, name)}.{suffix}"
    return f"{half}.{rest.replace('conv_shortcut', 'nin_shortcut')}"


def vae_state_dict_from_diffusers(sd: Mapping[str, Tensor], config: VaeConfig) -> dict[str, Tensor]:
    """A diffusers VAE state dict in ldm names, attention projections reshaped to 1x1 convs."""
    out = {}
    for key, value in sd.items():
        ldm_key = diffusers_to_ldm_vae_key(key, config)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (out, in) -> Conv2d (out, in, 1, 1)
        out[ldm_key] = value
    return out
