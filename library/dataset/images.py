"""Image loading and the per-image transforms of training: resize + crop to the bucket, flip, colour jitter.

Images travel as numpy arrays (H x W x 3 uint8 RGB, masks H x W float32) until ``to_tensor``. Loading
applies the EXIF orientation (sd-scripts does not, which trains phone photos sideways). Resizing uses
PIL only; the default filter is sd-scripts': area averaging when shrinking, Lanczos when enlarging.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.dataset.buckets import BucketAssignment

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP")

# --resize_interpolation names. sd-scripts runs "area" through OpenCV's INTER_AREA, which is pixel-area
# averaging: PIL's BOX filter computes the same thing when shrinking.
_RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "lanczos4": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}
INTERPOLATIONS: tuple[str, ...] = tuple(_RESAMPLING)

# EXIF orientations 5-8 are rotations by 90/270 degrees, which swap width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

# sd-scripts' colour augmentation: a third of the images get jittered, half of those by hue, half by gamma.
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT_DEGREES = 16.0  # OpenCV's hue unit is 2 degrees; sd-scripts shifts by up to 8 of them
GAMMA_RANGE = (0.95, 1.05)


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded (truncated, wrong format, not an image)."""


def _open_error(path: Path, error: Exception) -> CorruptImageError:
    return CorruptImageError(f"cannot read image {path}: {error}; re-export or remove the file")


def load_image(path: Path, *, with_alpha: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode ``path`` to RGB uint8 (H, W, 3), upright per EXIF, plus its alpha in [0, 1] when asked.

    The alpha is float32 (H, W), all ones for images without transparency. Colour values are taken as
    stored, not composited over a background, as sd-scripts does for alpha-masked training.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if with_alpha:
                rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
                rgb = np.ascontiguousarray(rgba[:, :, :3])
                alpha = rgba[:, :, 3].astype(np.float32) / 255.0
                return rgb, alpha
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy(), None
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _open_error(path, error) from error


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as ``load_image`` would return it, read from the header without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            # The base-class getexif reads only header chunks; PNG's override decodes the whole image to
            # look for an eXIf chunk after the pixel data, which is rare and would make this slow.
            orientation = Image.Image.getexif(opened).get(_EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise _open_error(path, error) from error
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def resample_filter(
    interpolation: str | None, source_size: tuple[int, int], target_size: tuple[int, int]
) -> Image.Resampling:
    """PIL filter for a --resize_interpolation name; None picks area when shrinking, Lanczos otherwise."""
    if interpolation is None:
        shrinking = source_size[0] >= target_size[0] and source_size[1] >= target_size[1]
        interpolation = "area" if shrinking else "lanczos"
    if interpolation not in _RESAMPLING:
        raise ValueError(
            f"unknown resize_interpolation {interpolation!r}; use one of {', '.join(INTERPOLATIONS)}"
        )
    return _RESAMPLING[interpolation]


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize an (H, W), (H, W, C) uint8 or float array to ``size`` = (width, height)."""
    source_size = (image.shape[1], image.shape[0])
    if source_size == tuple(size):
        return image
    resample = resample_filter(interpolation, source_size, size)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return np.array(Image.fromarray(image).resize(size, resample))
    if image.ndim == 2:
        return _resize_plane(image, size, resample)
    channels = [_resize_plane(image[:, :, c], size, resample) for c in range(image.shape[2])]
    return np.stack(channels, axis=2)


def _resize_plane(plane: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """One channel through PIL's 32-bit float mode, so masks keep their precision; dtype is preserved."""
    resized = np.array(Image.fromarray(plane.astype(np.float32)).resize(size, resample))
    if plane.dtype == np.uint8:
        return np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return resized.astype(plane.dtype)


def resize_and_crop(
    image: np.ndarray,
    assignment: BucketAssignment,
    *,
    random_crop: bool,
    rng: random.Random,
    interpolation: str | None = None,
    crop: tuple[int, int] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize to ``assignment.resized_size`` and crop to ``assignment.bucket_reso``.

    Returns the bucket-size array and the crop's (top, left) in resized coordinates. The crop is
    centred unless ``random_crop``; pass the returned ``crop`` back in to cut a mask or conditioning
    image the same way. Random offsets are drawn width first, then height, as sd-scripts does.
    """
    resized = resize(image, assignment.resized_size, interpolation)
    height, width = resized.shape[:2]
    bucket_width, bucket_height = assignment.bucket_reso
    if width < bucket_width or height < bucket_height:
        raise ValueError(
            f"resized image {width}x{height} is smaller than its bucket {bucket_width}x{bucket_height}; "
            "the bucket assignment does not belong to this image"
        )
    if crop is None:
        left = _crop_offset(width - bucket_width, random_crop, rng)
        top = _crop_offset(height - bucket_height, random_crop, rng)
    else:
        top, left = crop
        if not (0 <= top <= height - bucket_height and 0 <= left <= width - bucket_width):
            raise ValueError(
                f"crop (top={top}, left={left}) does not fit a {bucket_width}x{bucket_height} bucket"
                f" into a {width}x{height} image"
            )
    cropped = resized[top : top + bucket_height, left : left + bucket_width]
    return np.array(cropped), (top, left)  # a copy: never a view of the caller's array


def _crop_offset(excess: int, random_crop: bool, rng: random.Random) -> int:
    if excess <= 0:
        return 0
    return rng.randint(0, excess) if random_crop else excess // 2


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    """Mirror left-right (images and masks alike)."""
    return np.ascontiguousarray(image[:, ::-1])


def color_augment(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' ``color_aug``: with probability 0.33, a hue shift of up to +-16 degrees or a gamma in [0.95, 1.05].

    The gamma acts on values scaled to [0, 1] (the albumentations RandomGamma sd-scripts set out to
    copy); sd-scripts' own code raises raw 0-255 values to the power, which mostly brightens to white.
    """
    if rng.random() > COLOR_AUG_PROBABILITY:
        return image
    if rng.random() > 0.5:
        return shift_hue(image, rng.uniform(-HUE_SHIFT_LIMIT_DEGREES, HUE_SHIFT_LIMIT_DEGREES))
    return apply_gamma(image, rng.uniform(*GAMMA_RANGE))


def apply_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """255 * (x / 255) ** gamma, rounded, for a uint8 image."""
    scaled = (image.astype(np.float64) / 255.0) ** gamma
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def shift_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the hue of an RGB uint8 image by ``degrees``, keeping saturation and value (HSV hexcone)."""
    rgb = image.astype(np.float64) / 255.0
    value = rgb.max(axis=2)
    chroma = value - rgb.min(axis=2)
    hue = _hue_of(rgb, value, chroma)
    hue = (hue + degrees / 60.0) % 6.0
    return _rgb_from_hcv(hue, chroma, value)


def _hue_of(rgb: np.ndarray, value: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Hue in sextants [0, 6) (0 = red, 2 = green, 4 = blue); 0 for greys."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe_chroma = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        value == red,
        ((green - blue) / safe_chroma) % 6.0,
        np.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )
    return np.where(chroma > 0, hue, 0.0)


def _rgb_from_hcv(hue: np.ndarray, chroma: np.ndarray, value: np.ndarray) -> np.ndarray:
    # Standard hexcone reconstruction: each channel is value minus chroma times its distance to the hue.
    channels = []
    for offset in (5.0, 3.0, 1.0):  # red, green, blue
        k = (offset + hue) % 6.0
        channels.append(value - chroma * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    rgb = np.stack(channels, axis=-1)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], computed as torchvision's ToTensor + Normalize(0.5, 0.5)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"to_tensor expects an (H, W, C) uint8 image, got {image.dtype} with shape {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32).div(255.0)
    return tensor.sub(0.5).div(0.5)
