"""Deterministic quality check of a generated PNG, scored in [0, 1].

The score is a weighted mean of four measures, each mapped to [0, 1]:

- structure: how strongly neighbouring pixels agree, at full and at half resolution, so
  independent per-pixel noise scores close to 0 and smooth shapes close to 1;
- colorfulness: the Hasler and Süsstrunk (2003) metric, full inside a band of natural
  values and falling off towards grey images and towards per-pixel colour noise;
- contrast: standard deviation of the luminance (Rec. 709 weights);
- exposure: the share of pixels that are not clipped to black or white.

It needs only numpy and Pillow, so post-processing runs without torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from schemas.errors import SlotforgeError

# Luminance standard deviation that counts as full contrast; uniform noise in [0, 1] has 0.29.
FULL_CONTRAST_STD = 0.25
# Hasler-Süsstrunk colorfulness band that scores 1: their scale runs from 15 ("slightly
# colourful") to 82 ("highly colourful"). Uniform RGB noise measures about 150.
COLORFULNESS_BAND = (15.0, 90.0)
# Colorfulness at which the colorfulness measure reaches 0 above the band.
COLORFULNESS_ZERO = 180.0
# Luminance below or above these values counts as clipped.
CLIP_LOW = 2 / 255
CLIP_HIGH = 253 / 255

WEIGHTS = {"structure": 0.5, "colorfulness": 0.2, "contrast": 0.2, "exposure": 0.1}


class InvalidImageError(SlotforgeError):
    """The artifact is not a decodable image."""


@dataclass(frozen=True)
class ImageScore:
    """Overall score and its parts, all in [0, 1]."""

    score: float
    contrast: float
    colorfulness: float
    structure: float
    exposure: float

    def summary(self) -> str:
        return (
            f"score {self.score:.3f} (contrast {self.contrast:.2f}, "
            f"colorfulness {self.colorfulness:.2f}, structure {self.structure:.2f}, "
            f"exposure {self.exposure:.2f})"
        )


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


def _colorfulness(rgb255: np.ndarray) -> float:
    """Return the Hasler-Süsstrunk colorfulness of RGB values in [0, 255]."""
    red, green, blue = rgb255[..., 0], rgb255[..., 1], rgb255[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    spread = np.hypot(rg.std(), yb.std())
    mean = np.hypot(rg.mean(), yb.mean())
    return float(spread + 0.3 * mean)


def _colorfulness_measure(colorfulness: float) -> float:
    low, high = COLORFULNESS_BAND
    if colorfulness < low:
        return colorfulness / low
    if colorfulness <= high:
        return 1.0
    return max(0.0, (COLORFULNESS_ZERO - colorfulness) / (COLORFULNESS_ZERO - high))


def _neighbour_correlation(luminance: np.ndarray) -> float:
    """Return the mean correlation of each pixel's luminance with its right and lower neighbours.

    Independent noise gives about 0 and smooth shapes give close to 1; negative values count as 0.
    """
    correlations = []
    for first, second in (
        (luminance[:, :-1], luminance[:, 1:]),
        (luminance[:-1, :], luminance[1:, :]),
    ):
        if first.size < 2:
            continue
        first_centered = first - first.mean()
        second_centered = second - second.mean()
        denominator = np.sqrt((first_centered**2).sum() * (second_centered**2).sum())
        if denominator > 0:
            correlations.append(float((first_centered * second_centered).sum() / denominator))
    if not correlations:
        return 0.0
    return max(0.0, float(np.mean(correlations)))


def _structure(luminance: np.ndarray) -> float:
    """Average the neighbour correlation at full resolution and at half resolution.

    The half-resolution term detects blobs a few pixels wide that pixel noise on top of them
    hides at full resolution. Images smaller than 4x4 pixels use the full resolution only.
    """
    scales = [_neighbour_correlation(luminance)]
    height, width = (luminance.shape[0] // 2) * 2, (luminance.shape[1] // 2) * 2
    if height >= 4 and width >= 4:
        blocks = luminance[:height, :width].reshape(height // 2, 2, width // 2, 2)
        scales.append(_neighbour_correlation(blocks.mean(axis=(1, 3))))
    return float(np.mean(scales))


def score_array(rgb255: np.ndarray) -> ImageScore:
    """Score an RGB image given as an array of shape (height, width, 3) with values in [0, 255]."""
    if rgb255.ndim != 3 or rgb255.shape[2] != 3 or rgb255.shape[0] < 2 or rgb255.shape[1] < 2:
        raise InvalidImageError(
            f"expected an RGB image of at least 2x2 pixels, got shape {rgb255.shape}"
        )
    rgb255 = rgb255.astype(np.float64)
    luminance = _luminance(rgb255 / 255.0)

    contrast = min(1.0, float(luminance.std()) / FULL_CONTRAST_STD)
    colorfulness = _colorfulness_measure(_colorfulness(rgb255))
    structure = _structure(luminance)
    clipped = float(np.mean((luminance <= CLIP_LOW) | (luminance >= CLIP_HIGH)))
    exposure = 1.0 - clipped

    parts = {
        "contrast": contrast,
        "colorfulness": colorfulness,
        "structure": structure,
        "exposure": exposure,
    }
    score = sum(WEIGHTS[name] * value for name, value in parts.items())
    return ImageScore(score=round(min(1.0, max(0.0, score)), 6), **parts)


def score_png(data: bytes) -> ImageScore:
    """Decode image bytes (PNG or any format Pillow reads) and score them.

    Raises:
        InvalidImageError: the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise InvalidImageError(f"artifact is not a decodable image: {err}") from err
    return score_array(rgb)


def judge(score: ImageScore, threshold: float) -> tuple[bool, str]:
    """Accept the image when its score reaches the threshold; return the verdict and the reason."""
    if score.score >= threshold:
        return True, f"accepted: {score.summary()} >= threshold {threshold:.3f}"
    return False, f"rejected: {score.summary()} < threshold {threshold:.3f}"
