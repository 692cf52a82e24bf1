"""The KL autoencoder (VAE) of Stable Diffusion in the original ldm layout.

Module names equal the keys under ``first_stage_model.`` in single-file checkpoints
(``encoder.down.0.block.0.norm1.weight``, ``encoder.mid.attn_1.q.weight``, ``quant_conv.weight`` ...).
The same module serves SD1/SD2/SDXL (4 latent channels) and SD3 (16 latent channels, no quant convs).
Latent scaling (0.18215, 0.13025, SD3's scale and shift) belongs to the caller, not to this module.

Shapes: B batch, C channels, H/W pixel or latent height/width, Z latent channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VaeConfig:
    """Hyper-parameters of the ldm ``Encoder``/``Decoder`` pair (``ddconfig`` names where they exist)."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    use_quant_conv: bool = True  # SD3's VAE has neither quant_conv nor post_quant_conv
    norm_groups: int = 32


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = _group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        h = h.transpose(1, 2).unflatten(2, (height, width))  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom, as ldm does: (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks, then a Downsample except at the deepest level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool, norm_groups: int):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, norm_groups) for a, b in zip(widths, widths[1:]))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks, then an Upsample except at full resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool, norm_groups: int):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, norm_groups) for a, b in zip(widths, widths[1:]))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> Gaussian moments (B, 2Z, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        c = config
        widths = [c.ch * m for m in c.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(([c.ch] + widths)[i], widths[i], c.num_res_blocks, i != last, c.norm_groups)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], c.norm_groups)
        self.norm_out = _group_norm(widths[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.z_channels, 3, padding=1)  # mean and logvar ("double_z")

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, Z, h, w) -> image (B, out_channels, h*f, w*f).

    ``up[i]`` is resolution level i (0 = full size), as in ldm, so it runs in reverse index order.
    """

    def __init__(self, config: VaeConfig):
        super().__init__()
        c = config
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], c.norm_groups)
        level_inputs = widths[1:] + [widths[-1]]  # each level takes the width of the level below it
        self.up = nn.ModuleList(
            UpLevel(level_inputs[i], widths[i], c.num_res_blocks + 1, i != 0, c.norm_groups)
            for i in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior: independent Gaussians per latent element."""

    def __init__(self, moments: Tensor):
        mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # ldm's clamp keeps exp() finite

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """Encoder and decoder with the 1x1 quant convs between them and the latent space."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for every released SD VAE)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x in [-1, 1], (B, in_channels, H, W); computed in the weights' dtype."""
        moments = self.encoder(x.to(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent (B, Z, h, w) -> image in about [-1, 1], in the weights' dtype."""
        z = z.to(self.dtype)
        if self.config.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def infer_vae_config(state_dict: Mapping[str, Tensor]) -> VaeConfig:
    """Read a VaeConfig off checkpoint tensors (keys without ``first_stage_model.``).

    GroupNorm groups are not stored in weights; every released SD VAE uses 32.
    """
    if "encoder.conv_in.weight" not in state_dict or "decoder.conv_in.weight" not in state_dict:
        raise ValueError(
            "not an ldm VAE state dict: 'encoder.conv_in.weight' / 'decoder.conv_in.weight' missing "
            "(pass keys without the 'first_stage_model.' prefix; diffusers VAEs go through vae_keys)"
        )
    conv_in = state_dict["encoder.conv_in.weight"]
    ch = conv_in.shape[0]
    levels = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.down.")})
    ch_mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    num_res_blocks = len({key.split(".")[4] for key in state_dict if key.startswith("encoder.down.0.block.")})
    return VaeConfig(
        in_channels=conv_in.shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
        z_channels=state_dict["decoder.conv_in.weight"].shape[1],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        use_quant_conv="quant_conv.weight" in state_dict,
    )
