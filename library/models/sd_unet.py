"""The Stable Diffusion U-Net (SD1.x, SD2.x and SDXL) in the original ldm/sgm layout.

Module names equal the keys under ``model.diffusion_model.`` in SD1/SD2/SDXL single-file checkpoints
(``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`` ...), so a checkpoint loads with a plain
``load_state_dict`` and LoRA module paths come straight from ``named_modules()``. SDXL is the same network
with other constructor arguments (per-level transformer depth, no attention at level 0, ``label_emb``);
``SdxlUNet`` only gives it its own class. The file reads top-down like ldm's ``openaimodel.py`` /
``attention.py``: timestep embedding, ResBlock, resampling, attention, transformer, the U-Net, and finally
the config inference from checkpoint tensors.

Shapes: B batch, C channels, H/W latent height/width, L context tokens, D context width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.models.checkpointing import checkpointed


@dataclass(frozen=True)
class SdUNetConfig:
    """Hyper-parameters of an ldm/sgm ``UNetModel`` (SD1.x, SD2.x, SDXL), named as there.

    attention_levels: resolution levels (0 = full latent size) whose blocks carry a SpatialTransformer;
        ldm spells this as ``attention_resolutions`` in downsampling factors (4, 2, 1 = levels 0, 1, 2).
    transformer_depth: transformer blocks per SpatialTransformer. An int applies to every attention level
        (SD1/SD2: 1); a tuple gives one count per level, 0 exactly where ``attention_levels`` has no entry
        (SDXL: (0, 2, 10)). Always stored as that per-level tuple. The middle block takes the depth of the
        deepest attention level, as sgm's ``transformer_depth_middle`` does on every released model.
    num_heads / num_head_channels: SD1 fixes 8 heads at every level; SD2 and SDXL fix 64 channels per head,
        so their head count grows with the level width. Setting ``num_head_channels`` selects that rule.
    use_linear_in_transformer: SD2/SDXL store proj_in/proj_out as Linear, SD1 as 1x1 Conv.
    adm_in_channels: width of the extra vector ``y`` that ``label_emb`` maps into the timestep embedding
        (SDXL: 2816 = pooled bigG text embedding 1280 + 6 size values x 256); None for no ``label_emb``.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    context_dim: int = 768
    num_heads: int = 8
    num_head_channels: int | None = None
    use_linear_in_transformer: bool = False
    transformer_depth: int | tuple[int, ...] = 1
    norm_groups: int = 32
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        bad_levels = [level for level in self.attention_levels if not 0 <= level < len(self.channel_mult)]
        if bad_levels:
            raise ValueError(
                f"SdUNetConfig.attention_levels {bad_levels} out of range for channel_mult {self.channel_mult}; "
                f"use level indices 0..{len(self.channel_mult) - 1}"
            )
        if not self.attention_levels:
            raise ValueError("SdUNetConfig.attention_levels is empty; the middle block's transformer takes its depth "
                             "from the deepest attention level, so name at least one")
        object.__setattr__(self, "transformer_depth", self._depth_per_level())
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % self.heads_at(channels):
                raise ValueError(
                    f"SdUNetConfig: {channels} channels do not split into {self.heads_at(channels)} heads; "
                    "change num_heads / num_head_channels"
                )

    def _depth_per_level(self) -> tuple[int, ...]:
        levels = range(len(self.channel_mult))
        if isinstance(self.transformer_depth, int):
            return tuple(self.transformer_depth if level in self.attention_levels else 0 for level in levels)
        depth = tuple(self.transformer_depth)
        with_attention = tuple(level for level in levels if level < len(depth) and depth[level] > 0)
        shape_ok = len(depth) == len(self.channel_mult) and min(depth) >= 0
        if not shape_ok or with_attention != tuple(sorted(self.attention_levels)):
            raise ValueError(
                f"SdUNetConfig.transformer_depth {depth} needs one count per level of channel_mult "
                f"{self.channel_mult}, positive exactly at attention_levels {self.attention_levels}"
            )
        return depth

    def heads_at(self, channels: int) -> int:
        """Attention heads of a transformer with ``channels`` channels (ldm's SD1 vs SD2/SDXL rule)."""
        if self.num_head_channels is None:
            return self.num_heads
        return max(1, channels // self.num_head_channels)

    @property
    def middle_transformer_depth(self) -> int:
        """Transformer blocks in the middle block: the deepest attention level's count."""
        return self.transformer_depth[max(self.attention_levels)]


SD1_UNET_CONFIG = SdUNetConfig()
SD2_UNET_CONFIG = SdUNetConfig(context_dim=1024, num_head_channels=64, use_linear_in_transformer=True)
SDXL_UNET_CONFIG = SdUNetConfig(
    channel_mult=(1, 2, 4),
    attention_levels=(1, 2),
    transformer_depth=(0, 2, 10),
    context_dim=2048,
    num_head_channels=64,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32, cosine half first as in ldm."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between; 1x1 skip when the width changes."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # The Dropout keeps the final conv at index 3, where checkpoints store it.
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W), or to `size` when the skip
    connection it meets is not exactly twice as large (a latent side not divisible by the level count)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # A Sequential so the projection's key is to_out.0, as in the checkpoints.
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|L, heads*dim_head)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, dim_head)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, query_dim)


class GEGLU(nn.Module):
    """Gated GELU: one projection yields value and gate halves."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width; the Dropout keeps the output Linear at net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the text context, then feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, added back to its input."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, use_linear: bool, norm_groups: int):
        super().__init__()
        dim_head = channels // heads
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)
        )
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (height, width))  # (B, C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class TimestepEmbedSequential(nn.Sequential):
    """A U-Net block: hands each layer the extra input it needs (timestep embedding or context)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, upsample_size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


# SdUNet.forward computes in the dtype of this layer's weight, so weight-storage schemes (fp8) leave it as it is.
DTYPE_SOURCE_LAYER = "time_embed.0"


class SdUNet(nn.Module):
    """The SD denoiser: eps (or v) prediction from noisy latents, timesteps, text context and, with
    ``adm_in_channels``, the extra vector ``y`` (SDXL: pooled text embedding and size conditioning)."""

    def __init__(self, config: SdUNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        mc = config.model_channels
        emb_channels = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.label_emb = None
        if config.adm_in_channels is not None:
            # Nested so the keys read label_emb.0.0 / label_emb.0.2, as sgm stores them.
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(config.adm_in_channels, emb_channels),
                    nn.SiLU(),
                    nn.Linear(emb_channels, emb_channels),
                )
            )
        self.input_blocks, skip_channels = self._build_input_blocks(emb_channels)
        ch = skip_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_channels, ch, config.norm_groups),
            self._transformer(ch, config.middle_transformer_depth),
            ResBlock(ch, emb_channels, ch, config.norm_groups),
        )
        self.output_blocks = self._build_output_blocks(emb_channels, skip_channels)
        self.out = nn.Sequential(
            nn.GroupNorm(config.norm_groups, mc),
            nn.SiLU(),
            nn.Conv2d(mc, config.out_channels, 3, padding=1),
        )

    def _transformer(self, channels: int, depth: int) -> SpatialTransformer:
        c = self.config
        return SpatialTransformer(
            channels,
            heads=c.heads_at(channels),
            depth=depth,
            context_dim=c.context_dim,
            use_linear=c.use_linear_in_transformer,
            norm_groups=c.norm_groups,
        )

    def _build_input_blocks(self, emb_channels: int) -> tuple[nn.ModuleList, list[int]]:
        """Encoder half; also returns the channel count of every skip output, in order."""
        c = self.config
        blocks = [TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))]
        skip_channels = [c.model_channels]
        ch = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_channels, c.model_channels * mult, c.norm_groups)]
                ch = c.model_channels * mult
                if c.transformer_depth[level]:
                    layers.append(self._transformer(ch, c.transformer_depth[level]))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        return nn.ModuleList(blocks), skip_channels

    def _build_output_blocks(self, emb_channels: int, skip_channels: list[int]) -> nn.ModuleList:
        """Decoder half: each block consumes one skip output, deepest first."""
        c = self.config
        skips = list(skip_channels)
        ch = skips[-1]
        blocks = []
        for level in reversed(range(len(c.channel_mult))):
            out_ch = c.model_channels * c.channel_mult[level]
            for i in range(c.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), emb_channels, out_ch, c.norm_groups)]
                ch = out_ch
                if c.transformer_depth[level]:
                    layers.append(self._transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                blocks.append(TimestepEmbedSequential(*layers))
        return nn.ModuleList(blocks)

    @property
    def latent_multiple(self) -> int:
        """Any latent size works: each upsampling meets its skip connection's size (see forward)."""
        return 1

    @property
    def blocks(self) -> list[nn.Module]:
        """The input, middle and output blocks: what gradient checkpointing and --torch_compile work on."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def set_gradient_checkpointing(self, enabled: bool, cpu_offload: bool = False) -> None:
        """Recompute each input/middle/output block in backward instead of storing its activations;
        with cpu_offload the block inputs that checkpointing keeps wait in CPU memory."""
        self.gradient_checkpointing = enabled
        self.cpu_offload_checkpointing = enabled and cpu_offload

    def _run_block(self, block: TimestepEmbedSequential, h: Tensor, emb: Tensor, context: Tensor,
                   upsample_size: tuple[int, int] | None = None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed(block, h, emb, context, upsample_size, cpu_offload=self.cpu_offload_checkpointing)
        return block(h, emb, context, upsample_size)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W), timesteps (B,), context (B, L, context_dim) -> (B, out_channels, H, W).

        y (B, adm_in_channels) is required exactly when the config has ``adm_in_channels`` (SDXL: see
        ``library.models.sdxl_conditioning.sdxl_size_embedding``). Computes in the dtype of the weights and
        returns in the dtype of x.
        """
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))  # (B, 4*mc)
        if (y is None) != (self.label_emb is None):
            raise ValueError(
                f"this U-Net has adm_in_channels={self.config.adm_in_channels}: pass y (B, adm_in_channels) "
                "exactly when adm_in_channels is set (SDXL: pooled text embedding + size embedding)"
            )
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run_block(block, h, emb, context)
            skips.append(h)
        h = self._run_block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # An output block that upsamples meets the next skip: match its size (odd latent sides), as diffusers does.
            h = self._run_block(block, h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h).to(x.dtype)


class SdxlUNet(SdUNet):
    """The SDXL U-Net: SdUNet's code with an ``adm_in_channels`` config such as ``SDXL_UNET_CONFIG``.

    A class of its own because the family differs outside the model: sd-scripts names SDXL LoRA modules by
    these sgm paths (``lora_unet_input_blocks_4_1_...``) where SD1/SD2 files use diffusers paths, and
    ``networks/lora_targets.py`` tells the two apart by class.
    """

    def __init__(self, config: SdUNetConfig = SDXL_UNET_CONFIG):
        if config.adm_in_channels is None:
            raise ValueError("SdxlUNet needs SdUNetConfig.adm_in_channels (SDXL: 2816); use SdUNet without label_emb")
        super().__init__(config)


def infer_unet_config(state_dict: Mapping[str, Tensor]) -> SdUNetConfig:
    """Read an SD1/SD2/SDXL U-Net config off checkpoint tensors (keys without ``model.diffusion_model.``).

    Head counts and GroupNorm groups are not stored in weights. The released families tie them to the
    transformer projection layout: Linear proj_in (SD2, SDXL) means 64 channels per head, 1x1 Conv (SD1)
    8 heads; all use 32 groups.
    """
    if "input_blocks.0.0.weight" not in state_dict:
        raise ValueError(
            "not an SD U-Net state dict: 'input_blocks.0.0.weight' is missing "
            "(pass keys without the 'model.diffusion_model.' prefix)"
        )
    adm = state_dict.get("label_emb.0.0.weight")
    if adm is None and any(key.startswith("label_emb.") for key in state_dict):
        raise ValueError("this U-Net has a class-label table (label_emb.weight: an upscaler), not an SD1/SD2/SDXL U-Net")
    if adm is not None and adm.ndim != 2:
        raise ValueError(f"U-Net label_emb.0.0.weight has shape {tuple(adm.shape)}; an SDXL checkpoint stores a matrix")
    conv_in = state_dict["input_blocks.0.0.weight"]
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    num_res_blocks, num_levels = _count_blocks(state_dict)
    level_starts = [1 + level * (num_res_blocks + 1) for level in range(num_levels)]
    channel_mult = tuple(
        state_dict[f"input_blocks.{start}.0.out_layers.3.weight"].shape[0] // model_channels for start in level_starts
    )
    depth = tuple(_count_transformer_blocks(state_dict, f"input_blocks.{start}.1.") for start in level_starts)
    mid = "middle_block.1."
    use_linear = state_dict[mid + "proj_in.weight"].ndim == 2
    config = SdUNetConfig(
        in_channels=in_channels,
        out_channels=state_dict["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(level for level, count in enumerate(depth) if count),
        context_dim=state_dict[mid + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
        num_heads=8,
        num_head_channels=64 if use_linear else None,
        use_linear_in_transformer=use_linear,
        transformer_depth=depth,
        adm_in_channels=None if adm is None else adm.shape[1],
    )
    middle_depth = _count_transformer_blocks(state_dict, mid)
    if middle_depth != config.middle_transformer_depth:
        raise ValueError(
            f"U-Net middle block has {middle_depth} transformer blocks, the deepest attention level "
            f"{config.middle_transformer_depth}; this layout is not an SD1/SD2/SDXL U-Net"
        )
    return config


def _count_transformer_blocks(state_dict: Mapping[str, Tensor], transformer_prefix: str) -> int:
    """Blocks of the SpatialTransformer at ``transformer_prefix`` (0 when there is none)."""
    blocks_prefix = transformer_prefix + "transformer_blocks."
    return len({key[len(blocks_prefix):].split(".")[0] for key in state_dict if key.startswith(blocks_prefix)})


def _count_blocks(state_dict: Mapping[str, Tensor]) -> tuple[int, int]:
    """(num_res_blocks, levels) from the input-block count and the downsamplers among them."""
    input_ids = {int(key.split(".")[1]) for key in state_dict if key.startswith("input_blocks.")}
    num_downsamplers = sum(1 for i in input_ids if f"input_blocks.{i}.0.op.weight" in state_dict)
    num_levels = num_downsamplers + 1
    res_blocks = len(input_ids) - 1 - num_downsamplers
    if res_blocks <= 0 or res_blocks % num_levels:
        raise ValueError(
            f"U-Net state dict has {len(input_ids)} input_blocks with {num_downsamplers} downsamplers, "
            "which is not an SD1/SD2/SDXL block layout"
        )
    return res_blocks // num_levels, num_levels
