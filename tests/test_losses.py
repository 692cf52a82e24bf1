"""Element losses, Huber thresholds and SNR weights against hand-written formulas."""

import math

import pytest
import torch

from library.diffusion.losses import (
    debiased_estimation_weight,
    elementwise_loss,
    huber_c,
    mask_from_conditioning_image,
    masked_mean,
    min_snr_weight,
    v_pred_like_loss_term,
    v_pred_like_noise_scale,
)


def _sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's schedule written out independently, in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _snr_table() -> torch.Tensor:
    a = _sd_alphas_cumprod()
    return (a / (1 - a)).float()


T = torch.tensor([0, 1, 250, 500, 999])


def _huber(ts, schedule, loss_type="huber", c=0.1, scale=1.0):
    return huber_c(
        ts,
        schedule=schedule,
        huber_c=c,
        huber_scale=scale,
        loss_type=loss_type,
        alphas_cumprod=_sd_alphas_cumprod().float(),
        num_train_timesteps=1000,
    )


def test_huber_c_is_none_for_plain_losses():
    assert _huber(T, "snr", loss_type="l2") is None
    assert _huber(T, "constant", loss_type="l1") is None


def test_huber_c_constant():
    torch.testing.assert_close(_huber(T, "constant", c=0.2, scale=3.0), torch.full((5,), 0.6))


def test_huber_c_exponential():
    got = _huber(T, "exponential", loss_type="smooth_l1", c=0.1, scale=2.0)
    expected = torch.tensor([2.0 * 0.1 ** (t / 1000) for t in T.tolist()])
    torch.testing.assert_close(got, expected)
    assert got[0].item() == pytest.approx(2.0)


def test_huber_c_snr():
    got = _huber(T, "snr", c=0.1, scale=5.0)
    a = _sd_alphas_cumprod()
    expected = []
    for t in T.tolist():
        sigma = math.sqrt((1 - a[t].item()) / a[t].item())
        expected.append(0.9 / (1 + sigma) ** 2 + 0.1)  # huber_scale plays no part in this schedule
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert got[0] > 0.9 and got[-1] < 0.11


def test_huber_c_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="--huber_schedule"):
        _huber(T, "cosine")


PRED = torch.tensor([[0.0, 1.0, -2.0, 0.5]]).reshape(1, 1, 2, 2)
TARGET = torch.tensor([[3.0, 1.0, 1.0, 0.0]]).reshape(1, 1, 2, 2)


def test_l1_and_l2():
    d = [-3.0, 0.0, -3.0, 0.5]
    torch.testing.assert_close(
        elementwise_loss(PRED, TARGET, loss_type="l2", huber_c=None), torch.tensor([x * x for x in d]).reshape(1, 1, 2, 2)
    )
    torch.testing.assert_close(
        elementwise_loss(PRED, TARGET, loss_type="l1", huber_c=None), torch.tensor([abs(x) for x in d]).reshape(1, 1, 2, 2)
    )


def test_huber_and_smooth_l1():
    c = 0.5
    d = [-3.0, 0.0, -3.0, 0.5]
    smooth = [2 * (math.sqrt(x * x + c * c) - c) for x in d]
    got_smooth = elementwise_loss(PRED, TARGET, loss_type="smooth_l1", huber_c=torch.tensor([c]))
    got_huber = elementwise_loss(PRED, TARGET, loss_type="huber", huber_c=torch.tensor([c]))
    torch.testing.assert_close(got_smooth, torch.tensor(smooth).reshape(1, 1, 2, 2))
    torch.testing.assert_close(got_huber, c * torch.tensor(smooth).reshape(1, 1, 2, 2))


def test_huber_limits_and_per_sample_threshold():
    pred = torch.tensor([1e-3, 100.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    c = torch.tensor([1.0, 0.01], dtype=torch.float64)
    got = elementwise_loss(pred, torch.zeros_like(pred), loss_type="huber", huber_c=c).flatten()
    assert got[0].item() == pytest.approx(1e-6, rel=1e-3)  # ~ d**2 well inside c
    assert got[1].item() == pytest.approx(2 * 0.01 * 100.0, rel=1e-3)  # ~ 2c|d| far outside


def test_elementwise_loss_errors():
    with pytest.raises(ValueError, match="--loss_type"):
        elementwise_loss(PRED, TARGET, loss_type="l3", huber_c=None)
    with pytest.raises(ValueError, match="Huber threshold"):
        elementwise_loss(PRED, TARGET, loss_type="huber", huber_c=None)


def test_min_snr_weight_per_timestep():
    snr = _snr_table()
    gamma = 5.0
    eps = min_snr_weight(T, snr, gamma, v_prediction=False)
    v = min_snr_weight(T, snr, gamma, v_prediction=True)
    a = _sd_alphas_cumprod()
    for i, t in enumerate(T.tolist()):
        s = a[t].item() / (1 - a[t].item())
        assert eps[i].item() == pytest.approx(min(s, gamma) / s, rel=1e-5)
        assert v[i].item() == pytest.approx(min(s, gamma) / (s + 1), rel=1e-5)
    assert eps[-1].item() == pytest.approx(1.0)  # low SNR: unweighted
    assert eps[0].item() < 0.01


def test_v_pred_like_noise_scale_caps_snr_at_1000():
    snr = _snr_table()
    got = v_pred_like_noise_scale(T, snr)
    assert snr[0].item() > 1000
    assert got[0].item() == pytest.approx(1000 / 1001, rel=1e-6)
    s = snr[500].item()
    assert got[3].item() == pytest.approx(s / (s + 1), rel=1e-6)


def test_debiased_estimation_weight():
    snr = _snr_table()
    eps = debiased_estimation_weight(T, snr, v_prediction=False)
    v = debiased_estimation_weight(T, snr, v_prediction=True)
    assert eps[0].item() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)
    assert v[0].item() == pytest.approx(1 / 1001, rel=1e-6)
    s = snr[999].item()
    assert eps[-1].item() == pytest.approx(1 / math.sqrt(s), rel=1e-5)
    assert v[-1].item() == pytest.approx(1 / (s + 1), rel=1e-5)


def test_v_pred_like_loss_term():
    snr = _snr_table()
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    got = v_pred_like_loss_term(loss, T, snr, 0.2)
    for i, t in enumerate(T.tolist()):
        s = min(snr[t].item(), 1000.0)
        assert got[i].item() == pytest.approx(loss[i].item() * (s + 1) / s * 0.2, rel=1e-5)


def test_masked_mean_area_resizes_mask():
    loss = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    mask = torch.zeros(2, 4, 4)
    mask[0, :, :2] = 1.0  # left half of sample 0
    mask[1, 0, 0] = 1.0  # one pixel of the top-left 2x2 block of sample 1
    got = masked_mean(loss, mask)
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    corner = torch.tensor([[0.25, 0.0], [0.0, 0.0]])
    expected = torch.stack([(loss[0] * left).sum() / 12, (loss[1] * corner).sum() / 12])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(masked_mean(loss, torch.ones(2, 1, 8, 8)), loss.mean(dim=(1, 2, 3)))


def test_masked_mean_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="does not fit"):
        masked_mean(torch.zeros(2, 4, 2, 2), torch.ones(3, 8, 8))


def test_mask_from_conditioning_image_reads_red_channel():
    images = torch.zeros(1, 3, 2, 2)
    images[0, 0] = torch.tensor([[-1.0, 1.0], [0.0, 0.5]])
    images[0, 1:] = 1.0
    torch.testing.assert_close(mask_from_conditioning_image(images), torch.tensor([[[0.0, 1.0], [0.5, 0.75]]]))
