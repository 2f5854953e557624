"""Seeded generation, grids and the fidelity metrics."""

import numpy as np
from PIL import Image

from diffquant import compare, generate, image_grid
from diffquant.evaluate.metrics import PSNR_IDENTICAL


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
    from diffquant.models.shapes.dataset import sample

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


def _text_lengths(pipe, **kwargs) -> set[int]:
    """The text sequence lengths the transformer is called with while `generate` runs."""
    lengths = set()
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: lengths.add(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        generate(pipe, "a red circle on a blue background", steps=2, **kwargs)
    finally:
        handle.remove()
    return lengths


def test_shapes_sd3_profile_sets_defaults_and_the_t5_length(tiny_sd3_dir, tiny_sd3, tmp_path, monkeypatch):
    """shapes-sd3 ships later: a copy of the tiny SD3 folder stands in for its weights."""
    import shutil

    import diffquant.models.profiles
    from diffquant import default_prompts, load_pipeline
    from diffquant.models.generation import default_settings
    from diffquant.models.shapes.dataset import parse_caption
    from diffquant.models.shapes.model_sd3 import SD3_DEFAULT_GUIDANCE, SD3_DEFAULT_STEPS, SD3_MAX_SEQUENCE_LENGTH

    folders = diffquant.models.profiles.embedded_models() | {"shapes-sd3": shutil.copytree(tiny_sd3_dir, tmp_path / "w")}
    monkeypatch.setattr(diffquant.models.profiles, "embedded_models", lambda: folders)
    shapes_sd3 = load_pipeline("shapes-sd3", device="cpu")
    settings = default_settings(shapes_sd3)
    assert (settings.steps, settings.guidance) == (SD3_DEFAULT_STEPS, SD3_DEFAULT_GUIDANCE)
    assert all(parse_caption(p) for p in default_prompts(shapes_sd3, 4))
    assert default_prompts(tiny_sd3, 2) == ["A rabbit in a flower meadow"] * 2
    clip = shapes_sd3.tokenizer.model_max_length
    assert _text_lengths(shapes_sd3) == {clip + SD3_MAX_SEQUENCE_LENGTH}  # 16 T5 tokens, not the pipeline's 256
    assert _text_lengths(tiny_sd3) == {clip + 256}


def test_flux_generation_takes_its_profile_length_and_a_size(tiny_flux_schnell_dir):
    from diffquant import load_pipeline

    schnell = load_pipeline(str(tiny_flux_schnell_dir), device="cpu")
    assert _text_lengths(schnell, height=32, width=48) == {256}  # FLUX.1-schnell's card, not the pipeline's 512
    image = generate(schnell, "a red circle on a blue background", steps=1, height=32, width=48)[0]
    assert image.size == (48, 32)
