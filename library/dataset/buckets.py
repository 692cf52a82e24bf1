"""Aspect-ratio buckets: which batch resolution an image trains at, and how it is resized to get there.

Images of different shapes are grouped into "buckets" of equal (width, height) so a batch can be stacked
without padding. The rules are sd-scripts' (``make_bucket_resolutions`` and ``BucketManager.select_bucket``),
so a dataset lands in the same buckets here as it does there:

* Predefined buckets: every width from ``min_size`` to ``max_size`` in steps of ``divisible``, paired with
  the largest height (a multiple of ``divisible``, at most ``max_size``) whose area stays within the
  training resolution's area, plus the transposes and the square bucket.
* An image goes to the predefined bucket whose aspect ratio is closest to its own, and is scaled (up or
  down) so that it covers the bucket; the excess along one side is cropped away later.
* With ``bucket_no_upscale`` there are no predefined buckets: an image larger than the training area is
  shrunk to that area keeping its aspect ratio, a smaller one keeps its size, and the bucket is that size
  rounded down to ``reso_steps`` - images are never enlarged.

All sizes are ``(width, height)`` as in sd-scripts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: the batch resolution and the size it is resized to before cropping."""

    bucket_reso: Size
    """(width, height) of the batch this image goes to."""
    resized_size: Size
    """(width, height) the image is resized to; at least ``bucket_reso`` on both sides."""


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """All predefined bucket resolutions for a training resolution, sorted, without duplicates.

    ``max_reso`` is the training resolution; its area bounds every bucket's area. The square bucket uses
    the largest multiple of ``divisible`` not above sqrt(area), even if that is outside [min_size, max_size].
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, (max_area // width) // divisible * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def _cover_size(image_size: Size, bucket_reso: Size) -> Size:
    """Smallest aspect-preserving resize of the image that covers the bucket (rounded half up)."""
    width, height = image_size
    if width / height > bucket_reso[0] / bucket_reso[1]:
        scale = bucket_reso[1] / height  # wider than the bucket: match heights, crop the sides
    else:
        scale = bucket_reso[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def fixed_assignment(image_size: Size, resolution: Size) -> BucketAssignment:
    """``enable_bucket = false``: every image is resized to cover ``resolution`` and centre/random cropped to it."""
    _check_image_size(image_size)
    bucket = (int(resolution[0]), int(resolution[1]))
    return BucketAssignment(bucket_reso=bucket, resized_size=_cover_size(image_size, bucket))


def _check_image_size(image_size: Size) -> None:
    if image_size[0] <= 0 or image_size[1] <= 0:
        raise ValueError(f"image size {image_size[0]}x{image_size[1]} is empty; the image file is unusable")


class BucketManager:
    """Assigns images to buckets (sd-scripts' ``select_bucket`` semantics).

    ``assign`` is a pure function of the image size and the constructor arguments; the buckets that
    actually occur are collected by the caller from the assignments.
    """

    def __init__(
        self,
        no_upscale: bool,
        max_reso: Size | None,
        min_size: int | None,
        max_size: int | None,
        reso_steps: int,
    ) -> None:
        if max_reso is None:
            raise ValueError(
                "bucketing needs the training resolution: set --resolution or `resolution` in the dataset config"
            )
        if reso_steps is None or reso_steps <= 0:
            raise ValueError(f"bucket_reso_steps must be a positive integer, got {reso_steps!r}")
        if max_size is not None:
            if max_size < max_reso[0] or max_size < max_reso[1]:
                raise ValueError(
                    f"max_bucket_reso ({max_size}) must be at least the resolution's width and height {tuple(max_reso)}"
                )
            if min_size is not None and max_size < min_size:
                raise ValueError(f"max_bucket_reso ({max_size}) must be at least min_bucket_reso ({min_size})")
        self.no_upscale = no_upscale
        self.max_reso: Size = (int(max_reso[0]), int(max_reso[1]))
        self.max_area = self.max_reso[0] * self.max_reso[1]
        self.reso_steps = reso_steps
        self.predefined_resos: list[Size] = []
        if not no_upscale:
            # sd-scripts ignores min/max bucket sizes with no_upscale; they only shape the predefined list.
            if min_size is None or max_size is None:
                raise ValueError("min_bucket_reso and max_bucket_reso are required when bucket_no_upscale is off")
            self.predefined_resos = make_bucket_resolutions(self.max_reso, min_size, max_size, reso_steps)
        self._predefined_set = set(self.predefined_resos)

    def assign(self, image_size: Size) -> BucketAssignment:
        """The bucket and resized size for an image of ``image_size`` = (width, height)."""
        _check_image_size(image_size)
        if self.no_upscale:
            return self._assign_no_upscale(image_size)
        bucket = self._closest_bucket(image_size)
        return BucketAssignment(bucket_reso=bucket, resized_size=_cover_size(image_size, bucket))

    def _closest_bucket(self, image_size: Size) -> Size:
        """Predefined bucket with the nearest aspect ratio; an exact size match wins, ties go to the first."""
        image_size = (int(image_size[0]), int(image_size[1]))
        if image_size in self._predefined_set:
            return image_size
        aspect = image_size[0] / image_size[1]
        return min(self.predefined_resos, key=lambda reso: abs(reso[0] / reso[1] - aspect))

    def _round_to_steps(self, x: float) -> int:
        rounded = int(x + 0.5)
        return rounded - rounded % self.reso_steps

    def _assign_no_upscale(self, image_size: Size) -> BucketAssignment:
        width, height = image_size
        if width * height > self.max_area:
            resized_size = self._shrink_to_area(image_size)
        else:
            resized_size = (width, height)
        steps = self.reso_steps
        bucket = (resized_size[0] - resized_size[0] % steps, resized_size[1] - resized_size[1] % steps)
        if bucket[0] == 0 or bucket[1] == 0:
            raise ValueError(
                f"image of {width}x{height} is smaller than bucket_reso_steps={self.reso_steps} on one side;"
                " remove it or turn off bucket_no_upscale"
            )
        return BucketAssignment(bucket_reso=bucket, resized_size=resized_size)

    def _shrink_to_area(self, image_size: Size) -> Size:
        """Shrink to the training area keeping the aspect ratio, snapping the side that distorts it least."""
        aspect = image_size[0] / image_size[1]
        exact_width = math.sqrt(self.max_area * aspect)
        exact_height = self.max_area / exact_width

        width_snapped = self._round_to_steps(exact_width)
        height_for_width = self._round_to_steps(width_snapped / aspect)
        height_snapped = self._round_to_steps(exact_height)
        width_for_height = self._round_to_steps(height_snapped * aspect)
        error_width_snapped = _safe_ratio(width_snapped, height_for_width) - aspect
        error_height_snapped = _safe_ratio(width_for_height, height_snapped) - aspect

        if abs(error_width_snapped) < abs(error_height_snapped):
            return width_snapped, int(width_snapped / aspect + 0.5)
        return int(height_snapped * aspect + 0.5), height_snapped


def _safe_ratio(width: int, height: int) -> float:
    """width / height, infinite for a zero height so that candidate is never preferred."""
    return width / height if height else math.inf
