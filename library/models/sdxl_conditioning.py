"""SDXL's vector conditioning ``y``: the pooled text embedding followed by the embedded image sizes.

SDXL conditions its U-Net (through ``label_emb``) on the size of the source image, the top-left corner of
the crop taken from it, and the size it is trained or sampled at (micro-conditioning, SDXL paper §2.2). sgm
embeds each of the six numbers like a timestep (``ConcatTimestepEmbedderND``: 256 sinusoidal channels,
cosine half first) and concatenates them after the pooled bigG embedding, in the order
original (h, w), crop (top, left), target (h, w): 1280 + 6 x 256 = 2816 channels, ``adm_in_channels``.
diffusers takes the six numbers as ``time_ids`` in the same order and embeds them inside its U-Net.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from library.models.sd_unet import timestep_embedding

SIZE_EMBEDDING_DIM = 256  # channels per size value (sgm's ConcatTimestepEmbedderND outdim)
SIZE_VALUES = 6  # original h, w; crop top, left; target h, w


def sdxl_size_embedding(
    pooled: Tensor,
    original_size_hw: Tensor | Sequence[int],
    crop_top_left: Tensor | Sequence[int],
    target_size_hw: Tensor | Sequence[int],
) -> Tensor:
    """y (B, P + 1536) for ``SdUNet.forward`` from pooled (B, P) and three (B, 2) or (2,) size pairs.

    A (2,) pair applies to the whole batch (sampling); per-sample pairs come from the buckets in training.
    Pixel units, as sd-scripts and diffusers pass them. Returned in pooled's dtype.
    """
    batch = pooled.shape[0]
    pairs = {"original_size_hw": original_size_hw, "crop_top_left": crop_top_left, "target_size_hw": target_size_hw}
    values = torch.cat([_batch_pair(name, pair, batch, pooled.device) for name, pair in pairs.items()], dim=1)
    embedded = timestep_embedding(values.flatten(), SIZE_EMBEDDING_DIM)  # (B * 6, 256), value-major per sample
    return torch.cat([pooled, embedded.reshape(batch, SIZE_VALUES * SIZE_EMBEDDING_DIM).to(pooled.dtype)], dim=1)


def _batch_pair(name: str, pair: Tensor | Sequence[int], batch: int, device: torch.device) -> Tensor:
    tensor = torch.as_tensor(pair, dtype=torch.float32, device=device)
    if tensor.shape not in ((2,), (batch, 2)):
        raise ValueError(f"sdxl_size_embedding: {name} must have shape (2,) or ({batch}, 2), got {tuple(tensor.shape)}")
    return tensor.expand(batch, 2)
