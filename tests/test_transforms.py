"""Train augmentation (docs/methods.md §4) and evaluation preprocessing (§1.7)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from sats.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, center_crop, eval_transform,
                                  random_resized_crop_box, train_transform)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def two_halves(width: int = 64, height: int = 48) -> tuple[Image.Image, np.ndarray]:
    """Left half red with mask 3, right half blue with mask 7, 255 border row at the top."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2 :, 2] = 255
    mask = np.full((height, width), 3, np.uint8)
    mask[:, width // 2 :] = 7
    mask[0] = 255
    return Image.fromarray(pixels), mask


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


def test_train_output_and_mask_values() -> None:
    image, mask = two_halves()
    transform = train_transform(32, rng=random.Random(0))
    for _ in range(5):
        x, y = transform(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (32, 32) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {3, 7, 255}
        red = unnormalise(x)[0]
        assert red[y == 3].mean() > 0.8 and red[y == 7].mean() < 0.2  # image and mask aligned
    x, y = train_transform((16, 24), rng=random.Random(0))(image, mask)
    assert x.shape == (3, 16, 24) and y.shape == (16, 24)


def test_train_seeding() -> None:
    image, mask = two_halves(50, 40)
    outputs = []
    for rng in (random.Random(5), random.Random(5), torch.Generator().manual_seed(5),
                torch.Generator().manual_seed(5)):
        transform = train_transform(24, rng=rng)
        outputs.append([transform(image, mask) for _ in range(4)])
    for a, b in ((0, 1), (2, 3)):
        for (xa, ya), (xb, yb) in zip(outputs[a], outputs[b]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # different draws within one stream give different crops
    assert any(not torch.equal(outputs[0][0][1], y) for _, y in outputs[0][1:])
    random.seed(11)
    first = train_transform(24)(image, mask)
    random.seed(11)
    second = train_transform(24)(image, mask)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(("width", "height", "box"), [
    (40, 30, (0, 0, 30, 40)),     # ratio 4/3 within range: whole image
    (100, 20, (0, 36, 20, 27)),   # ratio 5 > 4/3: h = 20, w = round(20 * 4/3) = 27, centred
    (20, 100, (36, 0, 27, 20)),   # ratio 0.2 < 3/4: w = 20, h = round(20 / (3/4)) = 27
])
def test_crop_fallback(width: int, height: int, box: tuple[int, int, int, int]) -> None:
    # an area scale above 1 never fits, so every attempt fails and the fallback is used
    assert random_resized_crop_box(width, height, (1.5, 2.0), (3 / 4, 4 / 3), random.Random(0)) == box


def test_crop_attempts_statistics() -> None:
    rng = random.Random(0)
    boxes = [random_resized_crop_box(500, 375, (0.5, 2.0), (3 / 4, 4 / 3), rng) for _ in range(4000)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    areas = np.array([h * w / (500 * 375) for _, _, h, w in boxes])
    whole = np.mean([b == (0, 0, 375, 500) for b in boxes])
    assert areas.min() > 0.49 and areas.max() <= 1.0
    assert 0.6 < areas.mean() < 0.72   # docs/methods.md §4: mean ≈ 0.66
    assert 0.10 < whole < 0.20         # docs/methods.md §4: whole-image fallback ≈ 15 %


def test_flip_happens_both_ways() -> None:
    image, mask = two_halves(32, 24)
    transform = train_transform((24, 32), scale=(1.5, 2.0), rng=random.Random(1))  # whole image
    left_classes = {int(transform(image, mask)[1][5, 0]) for _ in range(20)}
    assert left_classes == {3, 7}
    no_flip = train_transform((24, 32), scale=(1.5, 2.0), flip=False, rng=random.Random(1))
    assert {int(no_flip(image, mask)[1][5, 0]) for _ in range(20)} == {3}


def test_small_image_upscaled_to_crop() -> None:
    image, mask = two_halves(12, 10)
    x, y = train_transform(32, rng=random.Random(0))(image, mask)
    assert x.shape == (3, 32, 32) and set(y.unique().tolist()) <= {3, 7, 255}


def test_eval_center_crop_matches_nearest_resize() -> None:
    width, height = 40, 30
    mask = np.tile((np.arange(width) // 10).astype(np.uint8), (height, 1))  # columns of 0,1,2,3
    image = Image.fromarray(np.zeros((height, width, 3), np.uint8))
    x, y = eval_transform(16, mode="center_crop")(image, mask)
    assert x.shape == (3, 16, 16) and y.shape == (16, 16)
    # shorter side 30 → 16, longer 40 → int(16 * 40 / 30) = 21; crop left = round(2.5) = 2
    src_cols = np.floor((np.arange(21) + 0.5) * width / 21).astype(int)
    expected_row = (src_cols // 10)[2:18]
    np.testing.assert_array_equal(y.numpy(), np.tile(expected_row, (16, 1)))


def test_eval_modes_and_normalisation() -> None:
    image = Image.fromarray(np.full((30, 40, 3), (124, 116, 104), np.uint8))
    mask = np.zeros((30, 40), np.uint8)
    x, y = eval_transform(16, mode="full")(image, mask)
    assert x.shape == (3, 30, 40) and y.shape == (30, 40)
    expected = (torch.tensor([124, 116, 104]) / 255.0 - MEAN.view(3)) / STD.view(3)
    torch.testing.assert_close(x[:, 5, 5], expected)
    x, y = eval_transform(15, mode="resize")(image, mask)
    assert x.shape == (3, 15, 20) and y.shape == (15, 20)
    with pytest.raises(ValueError, match="unknown eval mode 'crop'"):
        eval_transform(16, mode="crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differs from image size"):
        eval_transform(16)(image, mask[:10])


def test_center_crop_pads_mask_with_ignore() -> None:
    image = Image.fromarray(np.full((4, 6, 3), 200, np.uint8))
    mask = np.ones((4, 6), np.uint8)
    out_image, out_mask = center_crop(image, mask, 8)
    assert out_image.size == (8, 8) and out_mask.shape == (8, 8)
    assert out_mask[2:6, 1:7].tolist() == [[1] * 6] * 4
    assert (out_mask == 255).sum() == 64 - 24
    assert np.asarray(out_image)[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(out_image)[3, 3].tolist() == [200, 200, 200]
