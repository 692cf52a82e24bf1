"""MMDiT, the denoiser of Stable Diffusion 3 / 3.5, in the original single-file layout.

Module names equal the keys under ``model.diffusion_model.`` in SD3/SD3.5 checkpoints
(``joint_blocks.3.x_block.attn.qkv.weight``, ``final_layer.adaLN_modulation.1.bias`` ...), so a checkpoint
loads with a plain ``load_state_dict`` and LoRA module paths come straight from ``named_modules()``.
The file reads top-down like Stability AI's ``mmditx.py``: patch embedding, timestep and vector embedders,
attention, the per-stream DiT block, the joint block that lets text and image attend to each other, the
final layer, the model, and finally the config inference from checkpoint tensors.

The three released variants differ only in configuration:
- SD3 Medium: 24 joint blocks, position grid 192x192.
- SD3.5 Large: 38 joint blocks, RMSNorm on per-head queries and keys (``attn.ln_q`` / ``attn.ln_k``).
- SD3.5 Medium (MMDiT-X): 24 blocks, qk RMSNorm, a second image-only self-attention (``x_block.attn2``)
  on blocks 0-12, position grid 384x384.

Shapes: B batch, C latent channels, H/W latent height/width, N = (H/p)(W/p) image tokens for patch size p,
L text tokens, D hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.models.checkpointing import checkpointed
from library.models.sd_unet import timestep_embedding

# Every released MMDiT uses 64 channels per attention head; checkpoints without qk norm do not store it.
RELEASED_HEAD_DIM = 64


@dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters of an MMDiT (names as in ``mmditx.MMDiTX`` where they exist).

    depth: number of joint blocks; the last one's context stream is "pre-only" (it feeds the last
        attention but has no output of its own).
    hidden_size / num_heads: released models tie them to the depth (64 * depth, depth heads of 64).
    adm_in_channels: width of the pooled text vector (CLIP-L 768 + CLIP-G 1280).
    context_in_dim: width of the token context (T5-XXL's 4096; CLIP states are zero-padded to it).
    pos_embed_max_size: side of the stored square position-embedding grid, in patches; inputs use a
        crop of it, so it bounds the latent size at pos_embed_max_size * patch_size.
    qk_norm: None, or "rms" for RMSNorm over each head's queries and keys (SD3.5).
    x_block_self_attn_layers: blocks whose image stream gets the extra self-attention ``attn2``
        (MMDiT-X, SD3.5 Medium).
    """

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    adm_in_channels: int = 2048
    context_in_dim: int = 4096
    pos_embed_max_size: int = 192
    qk_norm: str | None = None
    x_block_self_attn_layers: tuple[int, ...] = ()
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"MMDiTConfig: hidden_size {self.hidden_size} does not split into {self.num_heads} heads")
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"MMDiTConfig.qk_norm must be None or 'rms', got {self.qk_norm!r}")
        outside = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth]
        if outside:
            raise ValueError(f"MMDiTConfig.x_block_self_attn_layers {outside} outside the {self.depth} joint blocks")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SD3_MEDIUM = MMDiTConfig()
SD35_LARGE = MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, qk_norm="rms")
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=tuple(range(13)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine of normalised tokens x (B, N, D) by shift, scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def crop_pos_embed(
    pos_embed: Tensor, max_size: int, height: int, width: int, top: int | None = None, left: int | None = None
) -> Tensor:
    """The (height x width) window of a stored (1, max_size**2, D) grid as (1, height*width, D).

    The window is centred unless ``top``/``left`` say otherwise (sd-scripts' random crop); centring
    rounds towards the top-left, as the reference does.
    """
    top, left = _window_origin(max_size, height, width, top, left)
    grid = pos_embed.unflatten(1, (max_size, max_size))  # (1, max, max, D)
    return grid[:, top : top + height, left : left + width].flatten(1, 2)


def _window_origin(side: int, height: int, width: int, top: int | None, left: int | None) -> tuple[int, int]:
    """The checked top-left corner of a (height x width) window in a side x side grid; centred when not given."""
    top = (side - height) // 2 if top is None else top
    left = (side - width) // 2 if left is None else left
    if not (0 <= top <= side - height and 0 <= left <= side - width):
        raise ValueError(
            f"a {height}x{width} patch grid at offset ({top}, {left}) does not fit the {side}x{side} "
            "position-embedding grid; use smaller latents or offsets within range"
        )
    return top, left


# Scaled position embeddings (sd-scripts' --enable_scaled_pos_embed, contributed there by KohakuBlueleaf).
# For multi-resolution training each training resolution gets its own sin-cos grid instead of a crop of the
# stored table: a "reference" input of r x r patches always spans the same SCALED_BASE_SIZE position units
# around the same centre, so small and large images see position values over the same range. The grid is
# SCALED_GRID_RATIO times the reference, leaving room for other aspect ratios and for random crops.
SCALED_BASE_SIZE = 16
SCALED_GRID_RATIO = 1.5


def sincos_pos_embed(dim: int, rows: Tensor, cols: Tensor) -> Tensor:
    """2D sin-cos embedding of the grid rows x cols (1D position tensors) -> (1, len(rows) * len(cols), dim).

    Row-major tokens; the first half of the channels encodes the column position, the second the row
    (the layout of the tables SD3 checkpoints store, from MAE's ``get_2d_sincos_pos_embed``). Each half is
    sines then cosines at frequencies 10000 ** (-k / (dim / 4)), k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 10000.0 ** -(torch.arange(quarter, dtype=torch.float32, device=rows.device) / quarter)

    def axis(positions: Tensor) -> Tensor:
        angles = positions.float()[:, None] * frequencies  # (len, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (len, dim/2)

    col_part = axis(cols)[None].expand(len(rows), -1, -1)  # (rows, cols, dim/2)
    row_part = axis(rows)[:, None].expand(-1, len(cols), -1)
    return torch.cat([col_part, row_part], dim=-1).flatten(0, 1)[None]


def scaled_grid_side(reference: int) -> int:
    """Side, in patches, of the scaled grid built for a reference size."""
    return int(reference * SCALED_GRID_RATIO)


def scaled_pos_embed_reference(references: Sequence[int], height: int, width: int) -> int:
    """The reference size (in patches) whose scaled grid an input of height x width patches uses.

    ``references`` are sorted ascending. By area, as sd-scripts does: a reference serves inputs up to midway
    between its square and the next one's (the largest serves everything above). An input too tall or wide
    for that grid gets its own reference, its longer side. (sd-scripts also remembers such a reference for
    later inputs, so its choice depends on what came before; ours depends on the input alone.)
    """
    area = height * width
    reference = references[-1]
    for smaller, larger in pairwise(references):
        if area <= (smaller**2 + larger**2) // 2:
            reference = smaller
            break
    side = scaled_grid_side(reference)
    return reference if height <= side and width <= side else max(height, width)


def scaled_pos_embed(
    dim: int, reference: int, height: int, width: int, top: int | None = None, left: int | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """The (height x width) window of the scaled sin-cos grid of a reference size, as (1, height*width, dim).

    Grid index i along either axis sits at position (i - (side - reference) / 2) * SCALED_BASE_SIZE / reference:
    position 0 lies (side - reference) / 2 patches in from the edge and every reference-wide stretch spans
    SCALED_BASE_SIZE units. The window is centred unless ``top``/``left`` say otherwise (random crops), like
    ``crop_pos_embed``.
    """
    side = scaled_grid_side(reference)
    top, left = _window_origin(side, height, width, top, left)
    spacing, centre_offset = SCALED_BASE_SIZE / reference, (side - reference) / 2

    def positions(start: int, count: int) -> Tensor:
        return (torch.arange(start, start + count, dtype=torch.float32, device=device) - centre_offset) * spacing

    return sincos_pos_embed(dim, positions(top, height), positions(left, width))


def unpatchify(tokens: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """(B, h*w, p*p*C) tokens, each a p x p patch stored row-major with channels last -> (B, C, h*p, w*p)."""
    p = patch_size
    patches = tokens.unflatten(1, (height, width)).unflatten(-1, (p, p, -1))  # (B, h, w, p, p, C)
    return patches.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention on (B, heads, len, head_dim) tensors -> (B, len_q, heads * head_dim)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of the latent, linearly embedded: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timesteps (B,) in [0, 1000] -> (B, D): 256-wide sinusoids (cosine half first), then an MLP."""

    frequency_dim = 256

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, timesteps: Tensor) -> Tensor:
        frequencies = timestep_embedding(timesteps, self.frequency_dim)  # float32, same sinusoids as ldm
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class VectorEmbedder(nn.Module):
    """The pooled text vector (B, adm_in_channels) -> (B, D) through an MLP."""

    def __init__(self, input_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: Tensor) -> Tensor:
        return self.mlp(y)


class SelfAttention(nn.Module):
    """Fused qkv projection (as stored), optional per-head RMSNorm of q and k, and the output projection.

    The joint block runs the attention itself over both streams; ``heads`` and ``proj`` are its halves.
    A pre-only stream has no ``proj``: its attention output is never used.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm == "rms":
            self.ln_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.ln_k = nn.RMSNorm(head_dim, eps=1e-6)
        else:
            self.ln_q = nn.Identity()
            self.ln_k = nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v each (B, heads, L, head_dim); the fused output is [q | k | v], head-major."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # each (B, L, heads, head_dim)
        q, k = self.ln_q(q), self.ln_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Plain self-attention within x (MMDiT-X's ``attn2``)."""
        return self.proj(attention(*self.heads(x)))


class Mlp(nn.Module):
    """fc1, tanh-approximated GELU, fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """One stream (image ``x_block`` or text ``context_block``) of a joint block.

    adaLN modulation chunks, from the conditioning vector c (B, D):
      full block:        shift/scale/gate for attention, shift/scale/gate for the MLP (6)
      with ``attn2``:    the 6 above, then shift/scale/gate for the extra self-attention (9)
      pre-only (last context block): shift/scale for the attention input only (2)
    """

    def __init__(self, config: MMDiTConfig, pre_only: bool = False, self_attention: bool = False):
        super().__init__()
        dim = config.hidden_size
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, config.num_heads, config.qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(dim, config.num_heads, config.qk_norm) if self_attention else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.num_chunks = 2 if pre_only else 9 if self_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_chunks * dim))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """Modulated q, k, v of this stream for the joint attention, and the modulation chunks for later."""
        chunks = self.adaLN_modulation(c).chunk(self.num_chunks, dim=1)
        shift_msa, scale_msa = chunks[:2]
        return self.attn.heads(modulate(self.norm1(x), shift_msa, scale_msa)), chunks

    def post_attention(self, x: Tensor, attn_out: Tensor, chunks: tuple[Tensor, ...]) -> Tensor:
        """Gated residuals: joint attention output, then (MMDiT-X) self-attention, then the MLP."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        out = x + gate_msa[:, None] * self.attn.proj(attn_out)
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
            # attn2 reads the block input x, normalised like the joint attention but modulated on its own.
            out = out + gate_msa2[:, None] * self.attn2(modulate(self.norm1(x), shift_msa2, scale_msa2))
        return out + gate_mlp[:, None] * self.mlp(modulate(self.norm2(out), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Text and image streams with their own weights, attending jointly over [context tokens, image tokens]."""

    def __init__(self, config: MMDiTConfig, pre_only: bool, self_attention: bool):
        super().__init__()
        self.context_block = DiTBlock(config, pre_only=pre_only)
        self.x_block = DiTBlock(config, self_attention=self_attention)

    def forward(self, x: Tensor, context: Tensor, c: Tensor) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D), context (B, L, D), c (B, D) -> (x, context); context is None after the last block."""
        context_qkv, context_chunks = self.context_block.pre_attention(context, c)
        x_qkv, x_chunks = self.x_block.pre_attention(x, c)
        keys, values = (torch.cat([a, b], dim=2) for a, b in zip(context_qkv[1:], x_qkv[1:]))
        if self.context_block.pre_only:
            # Nothing reads the context stream after the last block, so only image tokens need queries
            # (which also leaves that block's context ln_q without a gradient, as it has no effect).
            return self.x_block.post_attention(x, attention(x_qkv[0], keys, values), x_chunks), None
        queries = torch.cat([context_qkv[0], x_qkv[0]], dim=2)
        context_out, x_out = attention(queries, keys, values).split([context.shape[1], x.shape[1]], dim=1)
        x = self.x_block.post_attention(x, x_out, x_chunks)
        context = self.context_block.post_attention(context, context_out, context_chunks)
        return x, context


class FinalLayer(nn.Module):
    """adaLN (shift, scale) of the image tokens, then a Linear to p*p*C values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """The SD3/SD3.5 denoiser: velocity prediction from noisy latents, timesteps, text tokens and pooled text.

    Gradient checkpointing and CPU offload of the checkpointed inputs are switched on from outside
    (``set_gradient_checkpointing``), as are scaled position embeddings (``enable_scaled_pos_embed``);
    ``joint_blocks`` is the list block swapping walks.
    """

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.scaled_pos_embed_references: tuple[int, ...] = ()  # empty: crops of the stored table
        dim = config.hidden_size
        self.x_embedder = PatchEmbed(config.in_channels, dim, config.patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = VectorEmbedder(config.adm_in_channels, dim)
        self.context_embedder = nn.Linear(config.context_in_dim, dim)
        # Fixed (not trained) and stored in the checkpoints, so a persistent buffer: it loads and saves with
        # the weights, follows .to(dtype), and stays out of parameters(). Zero until a checkpoint fills it.
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size**2, dim))
        self.joint_blocks = nn.ModuleList(
            JointBlock(config, pre_only=i == config.depth - 1, self_attention=i in config.x_block_self_attn_layers)
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(dim, config.patch_size, config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def set_gradient_checkpointing(self, enabled: bool, cpu_offload: bool = False) -> None:
        """Recompute each joint block in backward instead of storing its activations.

        With ``cpu_offload`` (sd-scripts' --cpu_offload_checkpointing) the inputs each checkpointed block
        keeps for its recomputation (image tokens, context tokens, conditioning vector) are held in CPU
        memory between forward and backward, via ``torch.autograd.graph.save_on_cpu``.
        """
        self.gradient_checkpointing = enabled
        self.cpu_offload_checkpointing = enabled and cpu_offload

    def enable_scaled_pos_embed(self, latent_sizes: Iterable[int]) -> None:
        """Use scaled position embeddings (sd-scripts' --enable_scaled_pos_embed) instead of the stored table.

        ``latent_sizes``: for each training resolution, the side of the square latent of the same area
        (``round(sqrt(width * height)) // 8`` for a width x height bucket). Each becomes a reference size
        (in patches) with its own grid; see ``scaled_pos_embed_reference`` for which one an input uses. The
        embeddings are computed per call from the formula, so nothing is cached and no table is stored.
        """
        sizes = sorted(set(latent_sizes))
        references = sorted({size // self.config.patch_size for size in sizes})
        if not references or references[0] < 1:
            raise ValueError(
                f"MMDiT.enable_scaled_pos_embed needs latent sizes of at least {self.config.patch_size} "
                f"(one patch), got {sizes}"
            )
        self.scaled_pos_embed_references = tuple(references)

    def pos_embed_crop_range(self, height: int, width: int) -> tuple[int, int]:
        """The largest (top, left) window offset ``forward`` accepts for a (height, width) latent."""
        rows, cols = self.patch_grid(height, width)
        if self.scaled_pos_embed_references:
            side = scaled_grid_side(scaled_pos_embed_reference(self.scaled_pos_embed_references, rows, cols))
        else:
            side = self.config.pos_embed_max_size
        return side - rows, side - cols

    def position_embedding(self, rows: int, cols: int, offset: tuple[int, int] | None = None) -> Tensor:
        """(1, rows*cols, D) position embedding of a rows x cols patch grid, from the window at ``offset``."""
        top, left = offset if offset is not None else (None, None)
        references = self.scaled_pos_embed_references
        if not references:
            return crop_pos_embed(self.pos_embed, self.config.pos_embed_max_size, rows, cols, top, left)
        reference = scaled_pos_embed_reference(references, rows, cols)
        return scaled_pos_embed(self.config.hidden_size, reference, rows, cols, top, left, device=self.pos_embed.device)

    @property
    def blocks(self) -> list[nn.Module]:
        """The joint blocks: what gradient checkpointing, block swap and --torch_compile work on."""
        return list(self.joint_blocks)

    def _run_block(self, block: JointBlock, x: Tensor, context: Tensor, c: Tensor) -> tuple[Tensor, Tensor | None]:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return block(x, context, c)
        return checkpointed(block, x, context, c, cpu_offload=self.cpu_offload_checkpointing)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of the patch size."""
        return self.config.patch_size

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns for a (height, width) latent; checks it fits the stored position grid
        (scaled position embeddings have no size limit)."""
        p, max_size = self.config.patch_size, self.config.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(f"MMDiT: latent size {height}x{width} is not a multiple of the patch size {p}")
        fits = height // p <= max_size and width // p <= max_size
        if not fits and not self.scaled_pos_embed_references:
            raise ValueError(
                f"MMDiT: latent size {height}x{width} exceeds this model's position grid "
                f"({max_size} patches = {max_size * p} latent pixels a side); use a lower resolution"
            )
        return height // p, width // p

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor,
        pos_embed_offset: tuple[int, int] | None = None,
    ) -> Tensor:
        """x (B, C, H, W) noisy latents, timesteps (B,) = sigma * 1000, context (B, L, context_in_dim),
        y (B, adm_in_channels) pooled text -> (B, out_channels, H, W).

        ``pos_embed_offset`` (top, left) picks the window of the position grid, up to
        ``pos_embed_crop_range`` (sd-scripts' --pos_emb_random_crop_rate draws it); None centres it, as
        inference does. Computes in the dtype of the weights and returns in the dtype of x.
        """
        rows, cols = self.patch_grid(x.shape[-2], x.shape[-1])
        dtype = self.dtype
        pos = self.position_embedding(rows, cols, pos_embed_offset)
        h = self.x_embedder(x.to(dtype)) + pos.to(dtype)  # (B, N, D)
        c = self.t_embedder(timesteps) + self.y_embedder(y.to(dtype))  # (B, D)
        tokens = self.context_embedder(context.to(dtype))  # (B, L, D)
        for block in self.joint_blocks:
            h, tokens = self._run_block(block, h, tokens, c)
        out = self.final_layer(h, c)  # (B, N, p*p*out_channels)
        return unpatchify(out, rows, cols, self.config.patch_size).to(x.dtype)


def infer_mmdit_config(state_dict: Mapping[str, Tensor]) -> MMDiTConfig:
    """Read an MMDiTConfig off checkpoint tensors (keys without ``model.diffusion_model.``).

    Only keys and shapes are read, so meta tensors work. The head width is stored only with qk norm
    (``ln_q``'s size); otherwise it is the 64 every released model uses.
    """
    required = ("x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"not an SD3 MMDiT state dict: {', '.join(missing)} missing "
            "(pass keys without the 'model.diffusion_model.' prefix)"
        )
    proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _count_joint_blocks(state_dict)
    ln_q = state_dict.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = RELEASED_HEAD_DIM if ln_q is None else ln_q.shape[0]
    return MMDiTConfig(
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=state_dict["final_layer.linear.weight"].shape[0] // patch_size**2,
        depth=depth,
        hidden_size=hidden_size,
        num_heads=hidden_size // head_dim,
        adm_in_channels=state_dict["y_embedder.mlp.0.weight"].shape[1],
        context_in_dim=state_dict["context_embedder.weight"].shape[1],
        pos_embed_max_size=_grid_side(state_dict["pos_embed"].shape[1]),
        qk_norm=None if ln_q is None else "rms",
        x_block_self_attn_layers=_self_attention_layers(state_dict),
        mlp_ratio=state_dict["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden_size,
    )


def _count_joint_blocks(state_dict: Mapping[str, Tensor]) -> int:
    indices = {int(key.split(".")[1]) for key in state_dict if key.startswith("joint_blocks.")}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"MMDiT state dict: joint_blocks indices {sorted(indices)} are not 0..N-1")
    return len(indices)


def _self_attention_layers(state_dict: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Blocks whose image stream stores MMDiT-X's extra self-attention (``x_block.attn2.*``)."""
    layers = {
        int(key.split(".")[1]) for key in state_dict if key.startswith("joint_blocks.") and ".x_block.attn2." in key
    }
    return tuple(sorted(layers))


def _grid_side(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"MMDiT state dict: pos_embed has {tokens} positions, not a square grid")
    return side
