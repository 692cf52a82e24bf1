"""Low-rank factorisation of weight changes: the math shared by resizing, extracting and merging LoRAs.

A LoRA module stores `down` (rank x in [x k x k]), `up` (out x rank [x 1 x 1]) and `alpha`, and changes
its layer's weight by dW = up @ down * alpha / rank. Everything here works on dW itself: factor it by
SVD at a fixed or data-chosen rank, and report how much of it (Frobenius norm) the factors keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass(frozen=True)
class LowRank:
    """dW ≈ up @ down * alpha / rank, with `down`/`up` shaped for the layer (conv kernels kept)."""

    down: Tensor
    up: Tensor
    alpha: float
    singular_values: Tensor  # all of dW's singular values, largest first (float32)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def retained_fro(self) -> float:
        """Share of ||dW||_F the factors keep: sqrt(sum of kept s²) / sqrt(sum of all s²); 1 for dW = 0."""
        total = float(self.singular_values.square().sum())
        if total == 0.0:
            return 1.0
        return (float(self.singular_values[: self.rank].square().sum()) / total) ** 0.5


def choose_rank(singular_values: Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """The rank to keep, at most `max_rank` and at least 1.

    method None: `max_rank`. sv_ratio: the singular values within a factor `param` of the largest.
    sv_cumulative: the fewest leading values whose sum reaches `param` of the total. sv_fro: the fewest
    whose squared sum reaches `param`² of the total (they keep at least `param` of the Frobenius norm).
    """
    if method is None:
        return max(1, min(max_rank, singular_values.numel()))
    check_dynamic_method(method, param)
    s = singular_values.float()
    if float(s.sum()) == 0.0:
        return 1
    if method == "sv_ratio":
        keep = int((s >= s[0] / param).sum())
    else:
        values, target = (s, param) if method == "sv_cumulative" else (s.square(), param**2)
        cumulative = values.cumsum(0) / values.sum()
        # rounding can leave the last cumulative share a hair below 1
        keep = int((cumulative < target - 1e-7).sum()) + 1
    return max(1, min(max_rank, keep))


def check_dynamic_method(method: str | None, param: float | None) -> None:
    """Raise a one-line error naming the flag when --dynamic_method / --dynamic_param cannot be used."""
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"--dynamic_method {method!r}: expected one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise ValueError(f"--dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio" and not param >= 1:
        raise ValueError(f"--dynamic_param {param}: sv_ratio keeps values within a factor of the largest, so >= 1")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise ValueError(f"--dynamic_param {param}: {method} takes a share in (0, 1]")


def factorize(delta: Tensor, max_rank: int, *, method: str | None = None, param: float | None = None,
              alpha: float | None = None, scale: float | None = None,
              clamp_quantile: float | None = None) -> LowRank:
    """Factor a weight change (out x in, or out x in x k x k) into LoRA down/up by truncated SVD.

    The factors are divided by alpha / rank so that up @ down * alpha / rank is the truncated dW. Give
    `alpha` for a fixed alpha, or `scale` for alpha = scale * rank (keeps a LoRA's alpha/rank ratio when
    the rank is chosen from the data); neither means alpha = rank. The singular values are split evenly (sqrt each side)
    so neither factor dwarfs the other, which keeps later training on them well conditioned.
    `clamp_quantile` (extraction) clips the entries of U diag(s) and Vh at that quantile of their values,
    as sd-scripts does, taming outliers from tiny differences between checkpoints.
    """
    matrix = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _truncate(u, s, vh, tuple(delta.shape), max_rank, method, param, alpha, scale, clamp_quantile)


def factorize_lora(down: Tensor, up: Tensor, lora_scale: float, max_rank: int, *, method: str | None = None,
                   param: float | None = None, alpha: float | None = None, scale: float | None = None,
                   clamp_quantile: float | None = None) -> LowRank:
    """factorize(lora_delta_weight(down, up, lora_scale), ...) without forming dW (resizing a LoRA).

    dW = up @ down has rank <= r = down.shape[0], so with up = Qu Ru and down^T = Qd Rd (thin QR) its SVD
    is Qu (Ru Rd^T) Qd^T with the small r x r core decomposed: O((out + in) r^2) instead of a full SVD
    of an out x in matrix, which for a large conv layer is minutes on a CPU. `singular_values` holds
    the core's (at most r) values; dW's others are zero, so `retained_fro` and the dynamic rules see the
    same spectrum, and the rank never exceeds r.
    """
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(f"lora_up has {up.shape[1]} columns but lora_down has {rank} rows")
    q_up, r_up = torch.linalg.qr(up.reshape(up.shape[0], rank).float())
    q_down, r_down = torch.linalg.qr(down.reshape(rank, -1).float().T)
    u_core, s, vh_core = torch.linalg.svd((r_up @ r_down.T) * lora_scale, full_matrices=False)
    shape = (up.shape[0], *down.shape[1:])
    return _truncate(q_up @ u_core, s, vh_core @ q_down.T, shape, max_rank, method, param, alpha, scale, clamp_quantile)


def _truncate(u: Tensor, s: Tensor, vh: Tensor, shape: tuple[int, ...], max_rank: int, method: str | None,
              param: float | None, alpha: float | None, scale: float | None, clamp_quantile: float | None) -> LowRank:
    """LoRA factors of the leading singular triplets of dW = u diag(s) vh, shaped for a layer of `shape`."""
    rank = choose_rank(s, max_rank, method, param)
    if alpha is not None and scale is not None:
        raise ValueError("give alpha or scale, not both")
    alpha = float(alpha) if alpha is not None else float(rank) * (1.0 if scale is None else scale)
    up, down = u[:, :rank] * s[:rank], vh[:rank]  # dW ≈ up @ down: the factors extraction clamps (as sd-scripts)
    if clamp_quantile is not None and clamp_quantile < 1:
        up, down = _clamp_at_quantile(up, down, clamp_quantile)
    # Move sqrt(s) of each direction from up to down, so neither factor dwarfs the other (the product is unchanged).
    root = s[:rank].sqrt()
    nonzero = root > 0
    up = torch.where(nonzero, up / torch.where(nonzero, root, 1.0), 0.0)
    down = down * root[:, None]
    scale = alpha / rank
    up, down = up / scale**0.5, down / scale**0.5
    kernel = shape[2:]
    if kernel:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(shape[0], rank, *([1] * len(kernel)))
    return LowRank(down=down.contiguous(), up=up.contiguous(), alpha=alpha, singular_values=s)


_QUANTILE_SAMPLE = 1 << 24  # torch.quantile refuses larger inputs


def _clamp_at_quantile(up: Tensor, down: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """Clip both factors' entries to [-q, q], q the `quantile` of all their values together (sd-scripts'
    --clamp_quantile rule); very large factors are sampled evenly for the quantile."""
    values = torch.cat([up.flatten(), down.flatten()])
    step = -(-values.numel() // _QUANTILE_SAMPLE)
    limit = float(torch.quantile(values[::step], quantile))
    return up.clamp(-limit, limit), down.clamp(-limit, limit)
