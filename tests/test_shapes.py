"""shapes-sd: the dataset grammar, the ShapeEval detector, and the shipped trained model."""

import random

import numpy as np
import pytest

from diffquant.shapes.dataset import (COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, parse_caption, random_spec,
                                      render, sample, sample_captions)
from diffquant.shapes.shapeeval import ATTRIBUTES, detect, evaluate, score


def test_renderer_is_deterministic_per_seed():
    a, caption_a = sample(123)
    b, caption_b = sample(123)
    c, _ = sample(124)
    assert caption_a == caption_b
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.size == (32, 32) and a.mode == "RGB"


def test_captions_parse_back_into_their_attributes():
    rng = random.Random(0)
    for _ in range(300):
        spec = random_spec(rng)
        assert parse_caption(spec.caption) == spec
    assert parse_caption("a large red square in the center on a blue background") == ShapeSpec(
        "red", "square", "blue", "large", "in the center")
    assert parse_caption("a green circle on a white background").position is None


@pytest.mark.parametrize("caption", ["a red hexagon on a blue background", "a red circle on a pink background",
                                     "red circle on blue", "a rabbit in a flower meadow"])
def test_captions_outside_the_grammar_are_refused(caption):
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        parse_caption(caption)


def test_captions_never_use_one_colour_twice_and_cover_the_grammar():
    specs = [parse_caption(c) for c in sample_captions(2000, seed=5)]
    assert all(s.color != s.background for s in specs)
    assert {s.color for s in specs} == set(COLORS) and {s.shape for s in specs} == set(SHAPES)
    assert {s.size for s in specs} == {None, *SIZES} and {s.position for s in specs} == {None, *POSITIONS}


def test_detector_reads_rendered_images_at_99_percent_per_attribute():
    rng = random.Random(11)
    specs = [random_spec(rng, p_size=0.7, p_position=0.7) for _ in range(400)]
    images = [render(spec, seed) for seed, spec in enumerate(specs)]
    result = evaluate(images, [s.caption for s in specs])
    for attribute in ATTRIBUTES:
        assert result[attribute] >= 0.99, (attribute, result)
        assert result[f"n_{attribute}"] >= 200


def test_scorer_marks_a_wrong_image_wrong():
    image = render(ShapeSpec("red", "circle", "blue", "large", "on the left"), seed=1)
    hits = score(image, "a small yellow square on the right on a green background").hits
    assert not any(hits.values())
    assert score(image, "a large red circle on the left on a blue background").correct


def test_detector_reports_no_shape_on_a_blank_image():
    from PIL import Image

    assert detect(Image.new("RGB", (32, 32), (30, 60, 220))).shape is None


def test_shipped_model_loads_offline_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    from diffquant.pipeline import shapes_sd_path

    pipe = StableDiffusionPipeline.from_pretrained(shapes_sd_path())
    assert pipe.safety_checker is None
    files = [p for p in shapes_sd_path().rglob("*") if p.is_file()]
    assert not any(p.suffix in (".bin", ".pt", ".ckpt") for p in files)  # safetensors only
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_trained_model_follows_prompts_where_random_weights_do_not(shapes_pipe):
    """The shipped model beats a random-weight model of the same architecture by a wide margin,
    so a broken or untrained model fails this test."""
    from diffusers import StableDiffusionPipeline

    from diffquant import generate
    from diffquant.shapes.model import build_components
    from diffquant.pipeline import shapes_sd_path

    captions = sample_captions(12, seed=77)
    trained = evaluate(generate(shapes_pipe, captions, seed=0, steps=10), captions)
    vae, unet, text_encoder, tokenizer = build_components(shapes_sd_path() / "tokenizer")
    random_pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                          scheduler=shapes_pipe.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    untrained = evaluate(generate(random_pipe, captions, seed=0, steps=10), captions)
    colours = (trained["background"] + trained["color"]) / 2
    assert colours >= 0.75, trained
    assert (untrained["background"] + untrained["color"]) / 2 <= 0.4, untrained
    assert trained["overall"] > untrained["overall"]


def test_captions_read_as_english_and_parse_either_article():
    assert ShapeSpec("orange", "circle", "blue").caption == "an orange circle on a blue background"
    assert ShapeSpec("red", "square", "orange", "large").caption == "a large red square on an orange background"
    assert parse_caption("an orange circle on a white background") == ShapeSpec("orange", "circle", "white")
    assert parse_caption("a orange triangle on an purple background") == ShapeSpec("orange", "triangle", "purple")
    for caption in sample_captions(500, seed=3):
        words = caption.split()
        for article, following in zip(words, words[1:]):
            if article in ("a", "an"):  # "an" exactly before a vowel
                assert (article == "an") == (following[0] in "aeiou"), caption
        assert parse_caption(caption).caption == caption


def test_agreement_counts_images_whose_detections_match_the_reference():
    from diffquant.shapes.shapeeval import agreement

    specs = [ShapeSpec("red", "circle", "blue", "large", "on the left"),
             ShapeSpec("green", "square", "white", "small", "at the top")]
    reference = [render(s, seed=k) for k, s in enumerate(specs)]
    assert agreement(reference, reference)["all"] == 1.0
    changed = [reference[0], render(ShapeSpec("green", "triangle", "white", "small", "at the top"), seed=1)]
    result = agreement(reference, changed)
    assert result["all"] == 0.5 and result["shape"] == 0.5 and result["background"] == 1.0
