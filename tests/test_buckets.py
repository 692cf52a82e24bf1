"""Aspect-ratio buckets against hand-derived sd-scripts values and an independent re-derivation."""

import math

import pytest

from library.dataset.buckets import BucketAssignment, BucketManager, fixed_assignment, make_bucket_resolutions


def rederive_buckets(max_reso, min_size, max_size, step):
    """Brute force: for each allowed width, the tallest step-multiple height within area and max_size."""
    area = max_reso[0] * max_reso[1]
    found = set()
    square = step
    while (square + step) ** 2 <= area:
        square += step
    found.add((square, square))
    for width in range(min_size, max_size + 1, step):
        height = 0
        for candidate in range(step, max_size + 1, step):
            if width * candidate <= area:
                height = candidate
        if height >= min_size:
            found |= {(width, height), (height, width)}
    return sorted(found)


# sd-scripts' log for --resolution 512 with the default 256..1024 range (derived by hand from its formula).
SD15_512_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_512_buckets_match_the_known_sd_scripts_list():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD15_512_BUCKETS


@pytest.mark.parametrize(
    "max_reso,min_size,max_size,step",
    [((512, 512), 256, 1024, 64), ((1024, 1024), 256, 2048, 64), ((768, 512), 320, 960, 32), ((1024, 768), 512, 1024, 8)],
)
def test_bucket_list_equals_rederivation(max_reso, min_size, max_size, step):
    assert make_bucket_resolutions(max_reso, min_size, max_size, step) == rederive_buckets(max_reso, min_size, max_size, step)


def test_sdxl_buckets_have_the_known_members_and_respect_the_area():
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (1536, 640)} <= set(buckets)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 1024 * 1024 for w, h in buckets)
    assert buckets == sorted(set(buckets))


def closest_by_brute_force(buckets, width, height):
    aspect = width / height
    best = min(abs(w / h - aspect) for w, h in buckets)
    return [b for b in buckets if abs(b[0] / b[1] - aspect) == best][0]


@pytest.mark.parametrize("size", [(1000, 700), (700, 1000), (640, 480), (3000, 1000), (123, 457), (512, 512), (4000, 4000)])
def test_assign_picks_closest_aspect_and_covers_bucket(size):
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    assignment = manager.assign(size)
    assert assignment.bucket_reso == closest_by_brute_force(SD15_512_BUCKETS, *size)
    (bw, bh), (rw, rh) = assignment.bucket_reso, assignment.resized_size
    assert rw >= bw and rh >= bh
    assert rw == bw or rh == bh  # the smallest covering scale: one side fits exactly
    assert abs(rw / rh - size[0] / size[1]) < 2 / min(rw, rh)  # aspect kept up to rounding


def test_assign_known_value():
    # 1000x700 (aspect 1.43): 576x448 (1.29) is nearer than 640x384 (1.67); scale 448/700 covers it.
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    assert manager.assign((1000, 700)) == BucketAssignment(bucket_reso=(576, 448), resized_size=(640, 448))


def test_exact_bucket_size_keeps_its_own_bucket():
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    assert manager.assign((704, 320)) == BucketAssignment((704, 320), (704, 320))


def test_no_upscale_known_values():
    manager = BucketManager(True, (512, 512), None, None, 64)
    # Shrunk to the 512x512 area at aspect 1.5, both snaps agree on 576 wide.
    assert manager.assign((3000, 2000)) == BucketAssignment((576, 384), (576, 384))
    # Snapping the width (576 -> aspect 1.5) distorts less than snapping the height (512/384 = 1.33).
    assert manager.assign((1000, 700)) == BucketAssignment((576, 384), (576, 403))
    # Small enough: kept as is, bucket rounded down to the step.
    assert manager.assign((300, 200)) == BucketAssignment((256, 192), (300, 200))


@pytest.mark.parametrize("size", [(300, 200), (1000, 700), (2048, 333), (333, 2048), (511, 513), (5000, 4000), (64, 64)])
def test_no_upscale_never_enlarges(size):
    manager = BucketManager(True, (512, 512), None, None, 64)
    assignment = manager.assign(size)
    (bw, bh), (rw, rh) = assignment.bucket_reso, assignment.resized_size
    assert rw <= size[0] and rh <= size[1]
    assert bw <= rw and bh <= rh
    assert bw % 64 == 0 and bh % 64 == 0
    assert rw - bw < 64 and rh - bh < 64  # the bucket is the largest step multiple inside the image


def test_no_upscale_rejects_images_smaller_than_a_step():
    manager = BucketManager(True, (512, 512), None, None, 64)
    with pytest.raises(ValueError, match="bucket_reso_steps=64"):
        manager.assign((50, 300))


def test_fixed_assignment_covers_resolution():
    assert fixed_assignment((1000, 700), (512, 512)) == BucketAssignment((512, 512), (731, 512))
    assert fixed_assignment((300, 600), (512, 512)) == BucketAssignment((512, 512), (512, 1024))
    assert fixed_assignment((512, 512), (512, 512)) == BucketAssignment((512, 512), (512, 512))


def test_invalid_settings_are_rejected_with_the_setting_named():
    with pytest.raises(ValueError, match="max_bucket_reso"):
        BucketManager(False, (1024, 1024), 256, 768, 64)
    with pytest.raises(ValueError, match="min_bucket_reso"):
        BucketManager(False, (512, 512), 1024, 768, 64)
    with pytest.raises(ValueError, match="resolution"):
        BucketManager(True, None, None, None, 64)
    with pytest.raises(ValueError, match="empty"):
        BucketManager(False, (512, 512), 256, 1024, 64).assign((0, 10))


def test_every_image_of_a_sweep_lands_in_a_predefined_bucket():
    manager = BucketManager(False, (1024, 1024), 256, 2048, 64)
    buckets = set(make_bucket_resolutions((1024, 1024), 256, 2048, 64))
    for width in range(200, 3000, 97):
        for height in range(200, 3000, 131):
            assignment = manager.assign((width, height))
            assert assignment.bucket_reso in buckets
            assert math.isclose(
                assignment.resized_size[0] / assignment.bucket_reso[0], 1.0
            ) or math.isclose(assignment.resized_size[1] / assignment.bucket_reso[1], 1.0)
