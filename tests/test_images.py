"""Image loading, resize/crop and augmentation, and the fixture images (PIL/colorsys/numpy as oracles)."""

import colorsys
import random

import numpy as np
import pytest
import torch
from PIL import Image

from library.dataset.buckets import BucketAssignment
from library.dataset.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    apply_gamma,
    color_augment,
    flip_horizontal,
    image_size,
    load_image,
    resize,
    resize_and_crop,
    shift_hue,
    to_tensor,
)
from library.fixtures.images import draw_fixture_image, write_fixture_images


def halves_image(width, height):
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return pixels


def test_exif_orientation_6_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = halves_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(path, quality=100, exif=exif)

    assert image_size(path) == (20, 40)
    rgb, alpha = load_image(path, with_alpha=False)
    assert alpha is None
    expected = np.rot90(stored, k=-1)  # numpy: k=-1 is clockwise
    assert rgb.shape == (40, 20, 3)
    error = np.abs(rgb.astype(int) - expected.astype(int))
    assert error[:16].max() < 12 and error[24:].max() < 12  # away from the JPEG-blurred red/blue edge
    assert tuple(rgb[5, 10]) == pytest.approx((255, 0, 0), abs=8)  # red (left) is now on top
    assert tuple(rgb[35, 10]) == pytest.approx((0, 0, 255), abs=8)


def test_truncated_and_non_image_files_raise_corrupt_image_error(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")

    with pytest.raises(CorruptImageError, match="truncated.png"):
        load_image(truncated, with_alpha=False)
    with pytest.raises(CorruptImageError, match="notes.jpg"):
        load_image(text, with_alpha=True)
    with pytest.raises(CorruptImageError, match="notes.jpg"):
        image_size(text)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png", with_alpha=False)


def test_alpha_channel_is_returned_in_unit_range(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    rgb, alpha = load_image(path, with_alpha=True)
    assert alpha.dtype == np.float32
    np.testing.assert_allclose(alpha, rgba[..., 3] / 255.0, rtol=1e-6)
    assert (rgb[..., 0] == 200).all()  # colour stored as is, not composited

    opaque = tmp_path / "opaque.png"
    Image.fromarray(rgba[..., :3]).save(opaque)
    _, ones = load_image(opaque, with_alpha=True)
    assert ones.shape == (4, 6) and (ones == 1.0).all()


def column_coded_image(width, height):
    """Pixel (y, x) holds (x, y, 7) so any crop reveals its offset."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs, ys, np.full_like(xs, 7)], axis=2).astype(np.uint8)


def test_centre_crop_position_and_size():
    image = column_coded_image(100, 60)
    assignment = BucketAssignment(bucket_reso=(64, 48), resized_size=(100, 60))
    out, (top, left) = resize_and_crop(image, assignment, random_crop=False, rng=random.Random(0))
    assert (top, left) == (6, 18)  # (60 - 48) // 2, (100 - 64) // 2
    np.testing.assert_array_equal(out, image[6:54, 18:82])


def test_random_crop_draws_width_then_height_offsets():
    image = column_coded_image(100, 60)
    assignment = BucketAssignment(bucket_reso=(64, 48), resized_size=(100, 60))
    crops = set()
    for seed in range(10):
        out, (top, left) = resize_and_crop(image, assignment, random_crop=True, rng=random.Random(seed))
        reference = random.Random(seed)
        assert (left, top) == (reference.randint(0, 36), reference.randint(0, 12))
        np.testing.assert_array_equal(out, image[top : top + 48, left : left + 64])
        crops.add((top, left))
    assert len(crops) > 5


def test_mask_follows_the_image_crop():
    image = column_coded_image(100, 60)
    mask = image[..., 0].astype(np.float32) / 255.0
    assignment = BucketAssignment(bucket_reso=(64, 48), resized_size=(100, 60))
    _, crop = resize_and_crop(image, assignment, random_crop=True, rng=random.Random(4))
    cropped_mask, same = resize_and_crop(mask, assignment, random_crop=True, rng=random.Random(99), crop=crop)
    assert same == crop
    np.testing.assert_array_equal(cropped_mask, mask[crop[0] : crop[0] + 48, crop[1] : crop[1] + 64])


def test_default_downscale_is_area_averaging():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    block_mean = image.reshape(4, 2, 6, 2, 3).astype(np.float64).mean(axis=(1, 3))
    out, _ = resize_and_crop(image, BucketAssignment((6, 4), (6, 4)), random_crop=False, rng=random.Random(0))
    assert np.abs(out - block_mean).max() <= 1.0  # PIL's 8-bit fixed-point rounding

    mask = rng.random((8, 12)).astype(np.float32)
    np.testing.assert_allclose(resize(mask, (6, 4)), mask.reshape(4, 2, 6, 2).mean(axis=(1, 3)), atol=1e-6)


def test_resize_then_crop_to_bucket():
    image = column_coded_image(200, 100)
    assignment = BucketAssignment(bucket_reso=(64, 48), resized_size=(100, 50))
    out, (top, left) = resize_and_crop(image, assignment, random_crop=False, rng=random.Random(0))
    assert out.shape == (48, 64, 3) and (top, left) == (1, 18)
    # A 2x area downscale: resized column c averages source columns 2c and 2c + 1.
    np.testing.assert_allclose(out[0, :, 0], 2 * np.arange(18, 82) + 0.5, atol=1.0)
    np.testing.assert_allclose(out[:, 0, 1], 2 * np.arange(1, 49) + 0.5, atol=1.0)


def test_upscale_defaults_to_lanczos_and_names_are_checked():
    image = column_coded_image(10, 10)
    expected = np.asarray(Image.fromarray(image).resize((20, 20), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(resize(image, (20, 20)), expected)
    nearest = resize(image, (20, 20), "nearest")
    np.testing.assert_array_equal(nearest, image.repeat(2, axis=0).repeat(2, axis=1))
    with pytest.raises(ValueError, match="resize_interpolation"):
        resize(image, (20, 20), "sinc")


def test_flip_horizontal_mirrors_columns():
    image = column_coded_image(5, 3)
    flipped = flip_horizontal(image)
    assert flipped[:, :, 0].tolist() == [[4, 3, 2, 1, 0]] * 3
    np.testing.assert_array_equal(flip_horizontal(flipped), image)


def test_shift_hue_matches_colorsys():
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = shift_hue(pixels, 12.0)
    for y, x in [(0, 0), (3, 7), (15, 15), (8, 2), (11, 13)]:
        h, s, v = colorsys.rgb_to_hsv(*(pixels[y, x] / 255.0))
        expected = np.array(colorsys.hsv_to_rgb((h + 12.0 / 360.0) % 1.0, s, v)) * 255.0
        assert np.abs(out[y, x] - expected).max() <= 0.5 + 1e-9
    grey = np.full((2, 2, 3), 128, np.uint8)
    np.testing.assert_array_equal(shift_hue(grey, 15.0), grey)


def test_apply_gamma_formula():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    expected = np.rint(255.0 * (np.arange(256) / 255.0) ** 1.05).reshape(16, 16)
    np.testing.assert_array_equal(apply_gamma(image, 1.05)[..., 1], expected)


def test_color_augment_follows_sd_scripts_draws():
    image = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    changed = 0
    for seed in range(600):
        out = color_augment(image, random.Random(seed))
        reference = random.Random(seed)
        if reference.random() > 0.33:
            np.testing.assert_array_equal(out, image)
            continue
        changed += 1
        if reference.random() > 0.5:
            np.testing.assert_array_equal(out, shift_hue(image, reference.uniform(-16.0, 16.0)))
        else:
            np.testing.assert_array_equal(out, apply_gamma(image, reference.uniform(0.95, 1.05)))
    assert 0.28 < changed / 600 < 0.38


def test_to_tensor_maps_to_minus_one_one():
    image = np.array([[[0, 255, 51]]], dtype=np.uint8).repeat(2, axis=1)
    tensor = to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, 2)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1.0]))


@pytest.mark.parametrize("fmt,lossless", [("png", True), ("bmp", True), ("jpg", False), ("webp", False)])
def test_each_format_loads_with_fixture_content(tmp_path, fmt, lossless):
    sizes = [(48, 32), (32, 40)]
    paths = write_fixture_images(tmp_path, 3, sizes=sizes, seed=5, fmt=fmt)
    assert all(path.suffix in IMAGE_EXTENSIONS for path in paths)
    rng = np.random.default_rng(5)
    for index, path in enumerate(paths):
        drawn, caption = draw_fixture_image(sizes[index % 2], rng)
        assert image_size(path) == sizes[index % 2]
        rgb, _ = load_image(path, with_alpha=False)
        error = np.abs(rgb.astype(int) - np.asarray(drawn).astype(int))
        assert error.max() == 0 if lossless else error.mean() < 6
        assert path.with_suffix(".txt").read_text() == caption


def test_fixtures_are_seeded_distinct_and_take_captions(tmp_path):
    first = write_fixture_images(tmp_path / "a", 4, seed=1, captions=["w", "x", "y", "z"], caption_extension=".caption")
    again = write_fixture_images(tmp_path / "b", 4, seed=1, caption_extension=None)
    other = write_fixture_images(tmp_path / "c", 4, seed=2, caption_extension=None)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]
    assert [p.with_suffix(".caption").read_text() for p in first] == ["w", "x", "y", "z"]
    assert not list((tmp_path / "b").glob("*.txt"))
    pixels = [load_image(p, with_alpha=False)[0].astype(int) for p in first]
    assert all(np.abs(pixels[i] - pixels[j]).mean() > 10 for i in range(4) for j in range(i + 1, 4))
    with pytest.raises(ValueError, match="captions"):
        write_fixture_images(tmp_path / "d", 2, captions=["only one"])
