"""Unit tests of the image score used by post-processing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gpu_inference.scoring import ImageScore, InvalidImageError, judge, score_array, score_png


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array.astype(np.uint8))
    if mode is not None:
        image = image.convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _smooth_scene(size: int = 32) -> np.ndarray:
    """A floor-plan-like picture: coloured rooms with soft walls on a light background."""
    y, x = np.mgrid[0:size, 0:size] / size
    red = 200 - 120 * (x > 0.5) + 30 * np.sin(6 * y)
    green = 180 - 100 * (y > 0.4) + 30 * np.cos(5 * x)
    blue = 120 + 80 * ((x - 0.3) ** 2 + (y - 0.7) ** 2 < 0.05)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255)


def _noise(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3))


def test_score_is_deterministic() -> None:
    data = _png(_noise(3))

    assert score_png(data) == score_png(data)


def test_scores_stay_in_unit_interval() -> None:
    images = [
        _smooth_scene(),
        _noise(1),
        np.zeros((32, 32, 3)),
        np.full((32, 32, 3), 255),
        np.full((8, 8, 3), 128),
        _noise(2, size=2),
    ]
    for array in images:
        score = score_array(array)
        for value in (score.score, score.contrast, score.colorfulness, score.structure,
                      score.exposure):
            assert 0.0 <= value <= 1.0, (array.shape, score)


def test_structured_image_beats_noise() -> None:
    scene = score_array(_smooth_scene())
    noise = score_array(_noise(1))

    assert scene.structure > 0.8
    assert noise.structure < 0.1
    assert scene.score > noise.score + 0.3


def test_flat_image_scores_low() -> None:
    flat = score_array(np.full((32, 32, 3), 128))

    assert flat.contrast == 0.0
    assert flat.colorfulness == 0.0
    assert flat.structure == 0.0
    assert flat.score < 0.2


def test_clipped_image_loses_exposure() -> None:
    half_black = _smooth_scene()
    half_black[:, :16] = 0

    assert score_array(half_black).exposure == pytest.approx(0.5)


def test_colour_noise_loses_colorfulness() -> None:
    # Per-pixel RGB noise is far more colourful than any natural image.
    assert score_array(_noise(4)).colorfulness < 0.5
    assert score_array(_smooth_scene()).colorfulness > 0.9


def test_grey_and_rgba_png_accepted() -> None:
    scene = _smooth_scene().astype(np.uint8)

    grey = score_png(_png(scene, mode="L"))
    rgba = score_png(_png(scene, mode="RGBA"))

    assert grey.colorfulness == 0.0
    assert rgba.score == pytest.approx(score_array(scene).score)


def test_invalid_bytes_raise() -> None:
    with pytest.raises(InvalidImageError, match="not a decodable image"):
        score_png(b"not a png")
    with pytest.raises(InvalidImageError):
        score_png(_png(_smooth_scene())[:40])


def test_one_pixel_image_rejected() -> None:
    with pytest.raises(InvalidImageError, match="at least 2x2"):
        score_array(np.zeros((1, 1, 3)))


def test_judge_threshold_boundary() -> None:
    score = ImageScore(score=0.5, contrast=1.0, colorfulness=0.5, structure=0.2, exposure=1.0)

    accepted, reason = judge(score, 0.5)
    assert accepted is True
    assert reason.startswith("accepted: score 0.500")

    accepted, reason = judge(score, 0.51)
    assert accepted is False
    assert "< threshold 0.510" in reason


def test_noise_scores_spread() -> None:
    # Different images must not all land on one value, or no threshold could separate them.
    scores = [score_array(_noise(seed, size=16) // 2 + _smooth_scene(16) // 2).score
              for seed in range(5)]
    scores.append(score_array(_smooth_scene()).score)

    assert max(scores) - min(scores) > 0.1
