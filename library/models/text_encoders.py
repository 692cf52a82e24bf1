"""CLIP text encoders as ``transformers`` models, built from configs in code and fed single-file weights.

Two weight layouts occur in Stable Diffusion checkpoints:

* Hugging Face CLIP naming (SD1's ``cond_stage_model.transformer.*``, SDXL's first encoder, SD3's clip_l/clip_g),
  which we call the *canonical* layout: ``text_model.embeddings.*``, ``text_model.encoder.layers.N.*``,
  ``text_model.final_layer_norm.*`` and, for projection models, ``text_projection.weight``.
* OpenCLIP naming (SD2's ``cond_stage_model.model.*``, SDXL's ``conditioner.embedders.1.model.*``) with fused
  q/k/v ``in_proj`` weights and a ``text_projection`` matrix applied as ``x @ P``.

``openclip_to_hf_text_state_dict`` / ``hf_text_to_openclip_state_dict`` convert between the two and are exact
inverses. Recent transformers releases flattened ``CLIPTextModel`` (no ``text_model.`` level in its module
names) while ``CLIPTextModelWithProjection`` kept it; ``load_clip_text_model`` and ``hf_text_state_dict`` hide
that difference so files always use the canonical layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from accelerate import init_empty_weights
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.models.checkpoint import CheckpointError

TEXT_MODEL_PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"
# Every released CLIP text tower (CLIP-L 768, OpenCLIP ViT-H 1024, ViT-bigG 1280) uses 64-wide heads.
HEAD_WIDTH = 64

_TOKEN_EMBEDDING = TEXT_MODEL_PREFIX + "embeddings.token_embedding.weight"
_POSITION_EMBEDDING = TEXT_MODEL_PREFIX + "embeddings.position_embedding.weight"
_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")

# OpenCLIP key -> canonical key, for tensors copied unchanged.
_OPENCLIP_GLOBALS = {
    "token_embedding.weight": _TOKEN_EMBEDDING,
    "positional_embedding": _POSITION_EMBEDDING,
    "ln_final.weight": TEXT_MODEL_PREFIX + "final_layer_norm.weight",
    "ln_final.bias": TEXT_MODEL_PREFIX + "final_layer_norm.bias",
}
# Module inside an OpenCLIP resblock -> module inside an HF encoder layer.
_OPENCLIP_LAYER_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Parts of the full OpenCLIP model that the text encoder does not use.
_OPENCLIP_UNUSED = {"logit_scale", "attn_mask"}
_OPENCLIP_LAYER_INDEX = re.compile(r"transformer\.resblocks\.(\d+)\.")
_OPENCLIP_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OPENCLIP_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_HF_LAYER_PARAM = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def canonical_hf_text_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bring HF CLIP text weights into the canonical layout.

    Accepts keys with or without the ``text_model.`` level (old SD1 files and flattened ``CLIPTextModel``s omit
    it) and drops ``position_ids``, a constant buffer some checkpoints saved and newer transformers rejects.
    """
    canonical = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key != PROJECTION_KEY and not key.startswith(TEXT_MODEL_PREFIX):
            key = TEXT_MODEL_PREFIX + key
        canonical[key] = value
    return canonical


def hf_text_state_dict(model: CLIPTextModel | CLIPTextModelWithProjection) -> dict[str, Tensor]:
    """A transformers CLIP text model's weights in the canonical layout, as single files store them."""
    return canonical_hf_text_state_dict(model.state_dict())


def clip_config_from_hf_state_dict(state_dict: Mapping[str, Tensor], hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    """Read a CLIP text config off its weights.

    Not stored in the weights, so fixed by convention: 64-wide heads, and the activation, which is
    ``quick_gelu`` for OpenAI's CLIP-L and ``gelu`` for OpenCLIP towers (SD2 ViT-H, SDXL bigG).
    """
    sd = canonical_hf_text_state_dict(state_dict)
    if _TOKEN_EMBEDDING not in sd:
        raise CheckpointError(
            f"text encoder weights have no {_TOKEN_EMBEDDING}; found {sorted(sd)[:3]}... (is this a CLIP text model?)"
        )
    vocab_size, hidden_size = sd[_TOKEN_EMBEDDING].shape
    if hidden_size % HEAD_WIDTH:
        raise CheckpointError(f"CLIP text width {hidden_size} is not a multiple of CLIP's {HEAD_WIDTH}-wide heads")
    layers = {int(match.group(1)) for key in sd if (match := _LAYER_KEY.match(key))}
    projection = sd.get(PROJECTION_KEY)
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=sd[TEXT_MODEL_PREFIX + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=hidden_size // HEAD_WIDTH,
        max_position_embeddings=sd[_POSITION_EMBEDDING].shape[0],
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=projection.shape[0] if projection is not None else hidden_size,
        # CLIP's BPE vocabulary ends with <|startoftext|>, <|endoftext|>; pooling looks for the latter.
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    )


def load_clip_text_model(
    state_dict: Mapping[str, Tensor], *, with_projection: bool = False, hidden_act: str = "quick_gelu"
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Build a CLIP text model from HF-layout weights; the config is inferred, never fetched from the hub.

    A ``text_projection.weight`` is required for ``with_projection`` and ignored otherwise (SD1/SD2 use the
    hidden states only). Weights are assigned, not copied, so no second copy is ever allocated.
    """
    sd = canonical_hf_text_state_dict(state_dict)
    if not with_projection:
        sd.pop(PROJECTION_KEY, None)
    config = clip_config_from_hf_state_dict(sd, hidden_act=hidden_act)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with init_empty_weights():
        model = model_class(config)
    if not hasattr(model, "text_model"):
        sd = {key.removeprefix(TEXT_MODEL_PREFIX): value for key, value in sd.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"text encoder weights do not fit a {model_class.__name__}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def openclip_to_hf_text_state_dict(state_dict: Mapping[str, Tensor], drop_last_layers: int = 0) -> dict[str, Tensor]:
    """OpenCLIP text-tower weights (keys without the checkpoint prefix) -> canonical HF layout.

    ``drop_last_layers`` removes the top resblocks: SD2 conditions on the penultimate layer, so sd-scripts
    and diffusers build its encoder with 23 of OpenCLIP ViT-H's 24 layers.
    """
    num_layers = 1 + max((int(m.group(1)) for key in state_dict if (m := _OPENCLIP_LAYER_INDEX.match(key))), default=-1)
    if drop_last_layers < 0 or (drop_last_layers and drop_last_layers >= num_layers):
        raise ValueError(f"cannot drop {drop_last_layers} of the {num_layers} OpenCLIP text layers")
    kept_layers = num_layers - drop_last_layers
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _OPENCLIP_UNUSED:
            continue
        if key in _OPENCLIP_GLOBALS:
            converted[_OPENCLIP_GLOBALS[key]] = value
        elif key == "text_projection":
            converted[PROJECTION_KEY] = value.T.contiguous()
        elif match := _OPENCLIP_IN_PROJ.fullmatch(key):
            layer, param = match.groups()
            if int(layer) < kept_layers:
                for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                    converted[f"{TEXT_MODEL_PREFIX}encoder.layers.{layer}.self_attn.{name}_proj.{param}"] = part
        elif (match := _OPENCLIP_RESBLOCK.fullmatch(key)) and match.group(2) in _OPENCLIP_LAYER_MODULES:
            layer, module, param = match.groups()
            if int(layer) < kept_layers:
                hf_module = _OPENCLIP_LAYER_MODULES[module]
                converted[f"{TEXT_MODEL_PREFIX}encoder.layers.{layer}.{hf_module}.{param}"] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in OpenCLIP text-encoder weights")
    return converted


def hf_text_to_openclip_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical HF CLIP text weights -> OpenCLIP layout (the inverse of ``openclip_to_hf_text_state_dict``)."""
    sd = canonical_hf_text_state_dict(state_dict)
    globals_back = {hf: openclip for openclip, hf in _OPENCLIP_GLOBALS.items()}
    modules_back = {hf: openclip for openclip, hf in _OPENCLIP_LAYER_MODULES.items()}
    converted: dict[str, Tensor] = {}
    for key, value in sd.items():
        layer_match = _HF_LAYER_PARAM.fullmatch(key)
        if key in globals_back:
            converted[globals_back[key]] = value
        elif key == PROJECTION_KEY:
            converted["text_projection"] = value.T.contiguous()
        elif layer_match is None:
            raise CheckpointError(f"unexpected key {key!r} in CLIP text-encoder weights")
        else:
            layer, module, param = layer_match.groups()
            block = f"transformer.resblocks.{layer}."
            if module in modules_back:
                converted[f"{block}{modules_back[module]}.{param}"] = value
            elif module == "self_attn.q_proj":
                parts = [sd[f"{TEXT_MODEL_PREFIX}encoder.layers.{layer}.self_attn.{n}_proj.{param}"] for n in "qkv"]
                converted[f"{block}attn.in_proj_{param}"] = torch.cat(parts, dim=0)
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                raise CheckpointError(f"unexpected key {key!r} in CLIP text-encoder weights")
    return converted
