"""Seeded generation, grids and the fidelity metrics."""

import numpy as np
from PIL import Image

from diffquant import compare, generate, image_grid
from diffquant.metrics import PSNR_IDENTICAL


def test_image_k_is_the_same_whatever_the_batch_size(tiny_sd):
    prompts = ["a red circle on a blue background", "a green square on a white background", "a black triangle on a red background"]
    together = generate(tiny_sd, prompts, seed=7, steps=2, batch_size=3)
    one_by_one = generate(tiny_sd, prompts, seed=7, steps=2, batch_size=1)
    for a, b in zip(together, one_by_one):
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 1  # batched kernels may round by 1/255
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[1]))


def test_grid_has_one_row_per_entry_and_one_column_per_image():
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    grid = image_grid({"baseline": images, "int8-w": images, "fp8-w": images}, column_labels=["a", "b", "c"], cell=64)
    assert grid.size == (110 + 3 * 64, 18 + 3 * 64)


def _noisy(image, sigma, seed=0):
    array = np.asarray(image, float) + np.random.default_rng(seed).normal(0, sigma, (32, 32, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def test_compare_ranks_damage_and_scores_shapes_captions():
    from diffquant.shapes.dataset import sample

    pairs = [sample(s) for s in range(4)]
    images, prompts = [p[0] for p in pairs], [p[1] for p in pairs]
    same = compare(images, images, prompts)
    assert same.psnr_db == [PSNR_IDENTICAL] * 4 and min(same.ssim) > 0.999
    assert same.shapeeval["overall"] == 1.0
    light = compare(images, [_noisy(i, 3) for i in images], prompts).summary()
    heavy = compare(images, [_noisy(i, 40) for i in images], prompts).summary()
    assert 35 < light["psnr_db"] < PSNR_IDENTICAL and heavy["psnr_db"] < 20
    assert heavy["ssim"] < light["ssim"] < 1


def test_compare_skips_shapeeval_for_free_text_and_notes_missing_lpips():
    image = Image.new("RGB", (32, 32), "white")
    result = compare([image], [image], ["A rabbit in a flower meadow"])
    assert result.shapeeval is None
    assert result.lpips is not None or any("LPIPS" in note for note in result.notes)
