"""SD3 position-embedding options: --pos_emb_random_crop_rate (random window of the position grid) and
--enable_scaled_pos_embed (sd-scripts' scaled sin-cos grids per bucket resolution)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid
from train_helpers import lora_tensors, make_dataset

import sd3_train_network
from library.models.mmdit import (
    MMDiT,
    MMDiTConfig,
    scaled_grid_side,
    scaled_pos_embed,
    scaled_pos_embed_reference,
    sincos_pos_embed,
)
from sd3_train_network import bucket_latent_sizes, draw_pos_embed_offset

TINY = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, adm_in_channels=24, context_in_dim=40, pos_embed_max_size=6)


def tiny_model(config: MMDiTConfig = TINY, seed: int = 0) -> MMDiT:
    """Random weights everywhere, the position table included (the reference zero-initialises some layers)."""
    model = MMDiT(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(noise if name == "pos_embed" or tensor.ndim == 1 else noise / math.sqrt(tensor[0].numel()))
    return model


def inputs(config: MMDiTConfig, height: int, width: int, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, config.in_channels, height, width, generator=generator),
        "timesteps": torch.tensor([420.0]),
        "context": torch.randn(1, 5, config.context_in_dim, generator=generator),
        "y": torch.randn(1, config.adm_in_channels, generator=generator),
    }


def sd_scripts_scaled_table(dim: int, reference: int) -> torch.Tensor:
    """sd-scripts' scaled grid for a reference size, written from its formula: coordinates i / G scaled by
    16 G / s and shifted by scale (G - s) / (2 G), for G = int(1.5 s); sin-cos by diffusers' MAE helper
    (column coordinates first). Returns (G*G, dim) in float64."""
    side = int(reference * 1.5)
    scale = 16 * side / reference
    shift = scale * (side - reference) / (2 * side)
    coords = np.arange(side, dtype=np.float64) / side * scale - shift
    grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, side, side)  # [0]: column, [1]: row
    return get_2d_sincos_pos_embed_from_grid(dim, torch.from_numpy(grid))


def window(table: torch.Tensor, side: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Rows of a row-major (side*side, D) table in the window, by flat index."""
    index = (torch.arange(top, top + height)[:, None] * side + torch.arange(left, left + width)).flatten()
    return table[index]


# ----------------------------------------------------------------------------- random crop
def test_random_offset_changes_the_output_and_equals_a_manual_crop():
    """The window at (top, left) of the table is the centred window of the table shifted by the difference."""
    model = tiny_model()
    x = inputs(TINY, height=8, width=4)  # 4 x 2 patches in the 6 x 6 grid: centred at (1, 2)
    shifted = tiny_model()
    grid = model.pos_embed.unflatten(1, (6, 6))
    with torch.no_grad():
        shifted.pos_embed.copy_(torch.roll(grid, shifts=(1 - 0, 2 - 3), dims=(1, 2)).flatten(1, 2))
        centred = model(**x)
        cropped = model(**x, pos_embed_offset=(0, 3))
        expected = shifted(**x)
    assert (cropped - centred).abs().max() > 1e-2
    torch.testing.assert_close(cropped, expected, rtol=0, atol=0)


def test_rate_zero_never_crops_and_leaves_the_generator_alone():
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert all(draw_pos_embed_offset(0.0, (4, 4), generator, torch.device("cpu")) is None for _ in range(50))
    assert torch.equal(generator.get_state(), state)


def test_rate_one_always_draws_uniform_offsets_deterministically():
    def offsets(seed: int) -> list:
        generator = torch.Generator().manual_seed(seed)
        return [draw_pos_embed_offset(1.0, (2, 3), generator, torch.device("cpu")) for _ in range(600)]

    drawn = offsets(11)
    assert drawn == offsets(11) and drawn != offsets(12)
    assert all(offset is not None for offset in drawn)
    tops = np.bincount([top for top, _ in drawn], minlength=3)
    lefts = np.bincount([left for _, left in drawn], minlength=4)
    assert len(tops) == 3 and len(lefts) == 4  # nothing outside 0..range
    assert tops.min() > 600 / 3 * 0.75 and lefts.min() > 600 / 4 * 0.75  # every offset, roughly uniformly


def test_intermediate_rate_crops_that_share_of_calls():
    generator = torch.Generator().manual_seed(3)
    drawn = [draw_pos_embed_offset(0.3, (5, 5), generator, torch.device("cpu")) for _ in range(2000)]
    share = sum(offset is not None for offset in drawn) / len(drawn)
    assert abs(share - 0.3) < 0.04  # about four standard deviations of a binomial(2000, 0.3) share


def test_crop_range_is_the_room_left_in_the_grid():
    model = tiny_model()
    assert model.pos_embed_crop_range(8, 4) == (2, 4)  # 4 x 2 patches in the 6 x 6 table
    model.enable_scaled_pos_embed([8])  # reference 4 patches: a 6 x 6 scaled grid
    assert model.pos_embed_crop_range(4, 8) == (4, 2)
    assert model.pos_embed_crop_range(16, 16) == (4, 4)  # 8 x 8 patches: their own reference 8, grid 12


# ----------------------------------------------------------------------------- scaled position embeddings
@pytest.mark.parametrize("dim, reference", [(128, 4), (128, 5), (64, 11), (1536, 64)])
def test_scaled_grid_matches_sd_scripts_formula(dim, reference):
    side = scaled_grid_side(reference)
    expected = sd_scripts_scaled_table(dim, reference)
    full = scaled_pos_embed(dim, reference, side, side, top=0, left=0)[0]
    torch.testing.assert_close(full.double(), expected, rtol=0, atol=2e-5)
    height, width = max(1, side - 3), max(1, side - 1)
    centred = scaled_pos_embed(dim, reference, height, width)[0]
    top, left = (side - height) // 2, (side - width) // 2
    torch.testing.assert_close(centred.double(), window(expected, side, top, left, height, width), rtol=0, atol=2e-5)


def test_sincos_layout_matches_the_stored_table_convention():
    """Columns in the first half of the channels, rows in the second, row-major tokens (diffusers' tables)."""
    rows, cols = torch.tensor([0.0, 1.5, -2.0]), torch.tensor([3.0, 0.25])
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy")).reshape(2, 1, 3, 2).double()
    expected = get_2d_sincos_pos_embed_from_grid(32, grid)
    torch.testing.assert_close(sincos_pos_embed(32, rows, cols)[0].double(), expected, rtol=0, atol=1e-6)


def test_reference_is_chosen_by_area_and_widened_for_elongated_inputs():
    references = (4, 8, 16)  # area thresholds (16 + 64) // 2 = 40 and (64 + 256) // 2 = 160; grids 6, 12, 24
    assert scaled_pos_embed_reference(references, 6, 6) == 4
    assert scaled_pos_embed_reference(references, 7, 6) == 8
    assert scaled_pos_embed_reference(references, 12, 12) == 8
    assert scaled_pos_embed_reference(references, 13, 13) == 16
    assert scaled_pos_embed_reference(references, 20, 20) == 16  # above every threshold: the largest
    assert scaled_pos_embed_reference(references, 2, 20) == 20  # area 40 -> 4, but 20 > grid 6: its own
    assert scaled_pos_embed_reference(references, 30, 30) == 30  # 30 > grid 24
    assert scaled_pos_embed_reference((12, 18), 13, 18) == 12  # threshold (144 + 324) // 2 = 234 itself
    assert scaled_pos_embed_reference((12, 18), 14, 17) == 18  # 238


def test_scaled_model_equals_a_model_holding_the_scaled_table():
    """With the scaled grid copied into the stored table, the ordinary crop gives the same output."""
    scaled = tiny_model()
    scaled.enable_scaled_pos_embed([8, 8, 9])  # latent 8 (and 9, the same 4 patches): reference 4, grid 6
    assert scaled.scaled_pos_embed_references == (4,)
    stored = tiny_model()
    with torch.no_grad():
        stored.pos_embed.copy_(sd_scripts_scaled_table(TINY.hidden_size, 4)[None].float())
    x = inputs(TINY, height=8, width=4)
    with torch.no_grad():
        for offset in (None, (0, 0), (2, 4)):
            torch.testing.assert_close(scaled(**x, pos_embed_offset=offset), stored(**x, pos_embed_offset=offset),
                                       rtol=1e-4, atol=1e-4)
        assert (scaled(**x) - tiny_model()(**x)).abs().max() > 1e-2  # the random stored table is not used


def test_scaled_embeddings_lift_the_stored_grid_limit():
    model = tiny_model()
    x = inputs(TINY, height=16, width=16)  # 8 x 8 patches, beyond the 6 x 6 table
    with pytest.raises(ValueError, match="exceeds this model's position grid"):
        model(**x)
    model.enable_scaled_pos_embed([8])
    with torch.no_grad():
        out = model(**x)
    assert torch.isfinite(out).all() and out.shape == x["x"].shape


def test_bad_latent_sizes_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="enable_scaled_pos_embed"):
        model.enable_scaled_pos_embed([])
    with pytest.raises(ValueError, match="at least 2"):
        model.enable_scaled_pos_embed([1, 8])


def test_bucket_latent_sizes_are_square_equivalent_sides():
    # sqrt(832 * 1216) = 1005.8 -> 1006 // 8 = 125; sqrt(896 * 1152) = 1016.0 -> 127; 1024 // 8 = 128
    assert bucket_latent_sizes([(1024, 1024), (832, 1216), (1216, 832), (896, 1152)]) == [125, 127, 128]
    assert bucket_latent_sizes(iter([(64, 64)])) == [8]


# ----------------------------------------------------------------------------- through the CLI
def sd3_argv(checkpoint, tokenizers, dataset, output, *extra: str) -> list[str]:
    return [f"--pretrained_model_name_or_path={checkpoint}", f"--tokenizer_cache_dir={tokenizers}",
            f"--dataset_config={dataset}", f"--output_dir={output}", "--output_name=lora", "--network_module=networks.lora",
            "--network_dim=4", "--network_alpha=4", "--learning_rate=2e-3", "--seed=3", "--max_data_loader_n_workers=0",
            "--max_train_steps=3", "--cache_latents", *extra]


def test_cli_trains_with_both_options(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path, monkeypatch):
    calls = []
    original = MMDiT.position_embedding

    def spy(self, rows, cols, offset=None):
        calls.append((self.scaled_pos_embed_references, rows, cols, offset))
        return original(self, rows, cols, offset)

    monkeypatch.setattr(MMDiT, "position_embedding", spy)
    dataset = make_dataset(tmp_path / "data")  # 64 x 64 buckets: latent 8, reference 4 patches, grid 6
    out = tmp_path / "out"
    sd3_train_network.main(sd3_argv(tiny_sd3_checkpoints["sd3.5-large"], sd3_tokenizer_cache_dir, dataset, out,
                                    "--pos_emb_random_crop_rate=1", "--enable_scaled_pos_embed"))
    assert len(calls) == 3
    assert all(references == (4,) and (rows, cols) == (4, 4) for references, rows, cols, _ in calls)
    offsets = [offset for *_, offset in calls]
    assert all(offset is not None and 0 <= min(offset) and max(offset) <= 2 for offset in offsets)
    tensors = lora_tensors(out / "lora.safetensors")
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_cli_without_the_options_keeps_the_centred_stored_table(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path,
                                                                monkeypatch):
    calls = []
    original = MMDiT.position_embedding
    monkeypatch.setattr(MMDiT, "position_embedding",
                        lambda self, rows, cols, offset=None: calls.append((self.scaled_pos_embed_references, offset))
                        or original(self, rows, cols, offset))
    dataset = make_dataset(tmp_path / "data")
    sd3_train_network.main(sd3_argv(tiny_sd3_checkpoints["sd3-medium"], sd3_tokenizer_cache_dir, dataset, tmp_path / "out"))
    assert calls == [((), None)] * 3


def test_crop_rate_outside_zero_to_one_is_a_clear_error(tiny_sd3_checkpoints, sd3_tokenizer_cache_dir, tmp_path, capsys):
    dataset = make_dataset(tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        sd3_train_network.main(sd3_argv(tiny_sd3_checkpoints["sd3-medium"], sd3_tokenizer_cache_dir, dataset, tmp_path / "o",
                                        "--pos_emb_random_crop_rate=1.5"))
    assert info.value.code not in (0, None)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--pos_emb_random_crop_rate" in line and "1.5" in line

