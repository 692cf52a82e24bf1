"""networks.lora_svd: truncated-SVD factorisation of weight changes, the dynamic rank rules and the factor-space path."""

from __future__ import annotations

import math

import pytest
import torch

from networks.lora import lora_delta_weight
from networks.lora_svd import check_dynamic_method, choose_rank, factorize, factorize_lora
from lora_files import orthonormal

SHAPES = {"linear": (12, 10), "conv3x3": (6, 4, 3, 3), "conv1x1": (7, 5, 1, 1)}


def _with_spectrum(shape: tuple[int, ...], singular_values: list[float], seed: int = 0) -> torch.Tensor:
    """A weight change of `shape` whose flattened matrix has exactly these singular values."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    k = len(singular_values)
    u, v = orthonormal(rows, k, generator), orthonormal(cols, k, generator)
    return (u * torch.tensor(singular_values)) @ v.T


def _rebuilt(low_rank) -> torch.Tensor:
    return lora_delta_weight(low_rank.down, low_rank.up, low_rank.alpha / low_rank.rank)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", SHAPES)
def test_full_rank_factorization_reproduces_the_change_in_the_layer_shapes(kind):
    shape = SHAPES[kind]
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    full = min(shape[0], math.prod(shape[1:]))
    low_rank = factorize(delta, full)
    assert low_rank.rank == full
    assert low_rank.down.shape == (full, *shape[1:])
    assert low_rank.up.shape == (shape[0], full, *([1] * (len(shape) - 2)))
    assert _relative_error(_rebuilt(low_rank), delta) < 1e-5
    assert low_rank.retained_fro == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_truncation_keeps_the_leading_spectrum_and_reports_its_norm_share(kind, keep):
    s = [5.0, 3.0, 2.0, 0.5]
    delta = _with_spectrum(SHAPES[kind], s).reshape(SHAPES[kind])
    low_rank = factorize(delta, keep)
    expected_share = math.sqrt(sum(x * x for x in s[:keep]) / sum(x * x for x in s))
    assert low_rank.rank == keep
    assert low_rank.retained_fro == pytest.approx(expected_share, rel=1e-5)
    rebuilt = _rebuilt(low_rank)
    assert float(rebuilt.norm() / delta.norm()) == pytest.approx(expected_share, rel=1e-5)
    # Eckart-Young: the best rank-k approximation leaves exactly the dropped values' energy
    dropped = math.sqrt(sum(x * x for x in s[keep:]))
    assert float((delta - rebuilt).norm()) == pytest.approx(dropped, rel=1e-4)


def _reference_rank(s: list[float], method: str, param: float) -> int:
    """The rules written out by their definitions, one candidate rank at a time."""
    if method == "sv_ratio":
        return sum(1 for x in s if x >= s[0] / param)
    values = s if method == "sv_cumulative" else [x * x for x in s]
    target = param if method == "sv_cumulative" else param**2
    for k in range(1, len(s) + 1):
        if sum(values[:k]) >= target * sum(values) - 1e-9:
            return k
    return len(s)


def _off_boundary(method: str, param: float) -> bool:
    nearby = [param * 0.999, param * 1.001]
    if method != "sv_ratio":
        nearby = [min(p, 1.0) for p in nearby]
    return len({_reference_rank(SPECTRUM, method, p) for p in (param, *nearby)}) == 1


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5]
CASES = [("sv_ratio", p) for p in (1.0, 1.9, 2.0, 3.9, 4.0, 10.0, 100.0)] + [
    ("sv_cumulative", p) for p in (0.3, 0.6, 12 / 15.5, 0.8, 0.95, 0.99, 1.0)] + [
    ("sv_fro", p) for p in (0.5, 0.9, 0.95, 0.97, 0.99, 1.0)]


@pytest.mark.parametrize("method, param", CASES)
def test_dynamic_methods_pick_the_rank_their_definition_gives(method, param):
    expected = _reference_rank(SPECTRUM, method, param)
    assert choose_rank(torch.tensor(SPECTRUM), 10, method, param) == expected
    if _off_boundary(method, param):  # an SVD's rounding may land either side of an exact boundary
        low_rank = factorize(_with_spectrum((9, 7), SPECTRUM), 10, method=method, param=param)
        assert low_rank.rank == expected
    assert choose_rank(torch.tensor(SPECTRUM), 2, method, param) == min(2, expected)  # max_rank caps


def test_the_ranks_cover_every_case_of_the_spectrum():
    """The parameters above are chosen so each method picks several different ranks (a rule stuck at one value fails)."""
    for method in ("sv_ratio", "sv_cumulative", "sv_fro"):
        ranks = {_reference_rank(SPECTRUM, m, p) for m, p in CASES if m == method}
        assert len(ranks) >= 3, method


def test_sv_fro_keeps_at_least_the_asked_share_of_the_norm():
    delta = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    for param in (0.5, 0.8, 0.9, 0.99):
        low_rank = factorize(delta, 16, method="sv_fro", param=param)
        assert low_rank.retained_fro >= param - 1e-6
        if low_rank.rank > 1:  # and it is the fewest that do
            assert factorize(delta, low_rank.rank - 1).retained_fro < param


def test_zero_change_gives_rank_one_and_keeps_everything():
    low_rank = factorize(torch.zeros(6, 4, 3, 3), 4, method="sv_fro", param=0.9)
    assert low_rank.rank == 1 and low_rank.retained_fro == 1.0
    assert not _rebuilt(low_rank).any()


def test_alpha_and_scale_conventions():
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    fixed = factorize(delta, 3, alpha=1.5)
    assert fixed.alpha == 1.5
    by_scale = factorize(delta, 3, scale=0.25)
    assert by_scale.alpha == pytest.approx(0.25 * 3)
    plain = factorize(delta, 3)
    assert plain.alpha == 3.0
    # whatever alpha is, up @ down * alpha / rank is the same truncated change
    for other in (fixed, by_scale):
        torch.testing.assert_close(_rebuilt(other), _rebuilt(plain), rtol=1e-5, atol=1e-6)
    # the factors carry the inverse of alpha / rank, split evenly between them
    ratio = float(fixed.up.norm() / plain.up.norm())
    assert ratio == pytest.approx((3 / 1.5) ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="alpha or scale"):
        factorize(delta, 3, alpha=1.0, scale=1.0)


def test_dynamic_rank_with_scale_keeps_the_alpha_over_rank_ratio():
    low_rank = factorize(_with_spectrum((9, 7), SPECTRUM), 10, method="sv_ratio", param=4.5, scale=0.5)
    assert low_rank.rank == 3 and low_rank.alpha == pytest.approx(1.5)


def test_clamp_quantile_clips_u_s_and_vh_at_that_quantile_as_sd_scripts():
    """sd-scripts' rule, written out here: U diag(s) and Vh of the kept directions, both clipped to [-q, q]
    with q the quantile of all their values; the factors we store multiply back to exactly that."""
    generator = torch.Generator().manual_seed(4)
    delta = torch.randn(30, 20, generator=generator)
    delta[0, 0] = 200.0  # an outlier that dominates one singular direction
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    us, v = u[:, :4] * s[:4], vh[:4]
    limit = torch.quantile(torch.cat([us.flatten(), v.flatten()]), 0.9)
    expected = us.clamp(-limit, limit) @ v.clamp(-limit, limit)
    clamped = factorize(delta, 4, clamp_quantile=0.9, alpha=2.0)
    torch.testing.assert_close(lora_delta_weight(clamped.down, clamped.up, clamped.alpha / clamped.rank), expected,
                               rtol=1e-5, atol=1e-5)
    free = factorize(delta, 4)
    assert not torch.allclose(lora_delta_weight(free.down, free.up, 1.0), expected, atol=1e-2)  # the clamp really bit
    assert torch.equal(factorize(delta, 4, clamp_quantile=1.0).up, free.up)


@pytest.mark.parametrize("kind", SHAPES)
def test_factor_space_path_matches_the_dense_svd(kind):
    shape = SHAPES[kind]
    generator = torch.Generator().manual_seed(5)
    rank = 3
    down = torch.randn(rank, *shape[1:], generator=generator)
    up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=generator)
    delta = lora_delta_weight(down, up, 0.5)
    for max_rank in (1, 2, 3):
        dense, factored = factorize(delta, max_rank, scale=0.5), factorize_lora(down, up, 0.5, max_rank, scale=0.5)
        assert factored.rank == dense.rank and factored.alpha == dense.alpha
        torch.testing.assert_close(factored.singular_values, dense.singular_values[:rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_rebuilt(factored), _rebuilt(dense), rtol=1e-4, atol=1e-5)
        assert factored.retained_fro == pytest.approx(dense.retained_fro, rel=1e-5)
    # dW has rank 3: asking for more gives 3, never factors padded with zero directions
    assert factorize_lora(down, up, 0.5, 10).rank == rank
    assert _relative_error(_rebuilt(factorize_lora(down, up, 0.5, 10)), delta) < 1e-5


def test_factor_space_path_rejects_a_mismatched_pair():
    with pytest.raises(ValueError, match="lora_up has 4 columns but lora_down has 3 rows"):
        factorize_lora(torch.randn(3, 5), torch.randn(6, 4), 1.0, 2)


@pytest.mark.parametrize("method, param, message", [
    ("sv_median", 0.5, "--dynamic_method 'sv_median'"),
    ("sv_fro", None, "needs --dynamic_param"),
    ("sv_ratio", 0.5, "sv_ratio .* >= 1"),
    ("sv_fro", 1.5, r"sv_fro takes a share in \(0, 1\]"),
    ("sv_cumulative", 0.0, "sv_cumulative takes a share"),
    ("sv_fro", float("nan"), "sv_fro takes a share"),
])
def test_bad_dynamic_settings_name_the_flag(method, param, message):
    with pytest.raises(ValueError, match=message):
        check_dynamic_method(method, param)
    with pytest.raises(ValueError, match=message):
        choose_rank(torch.tensor(SPECTRUM), 4, method, param)
