"""Evaluation at scale: two accelerate processes make the same images and metrics as one, a resumed run
makes only what is missing, CLIP score and FID run through torchmetrics on a tiny CLIP saved by the test."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOKENIZER

pytestmark = pytest.mark.slow  # exports, full runs or benchmarks: `pytest -m 'not slow'` leaves them out

PROMPTS = ["a red circle on a white background", "a small blue square on the left on a black background",
           "a green triangle at the top on a yellow background", "a large purple circle on a white background",
           "an orange square in the center on a blue background", "a white triangle on a red background",
           "a yellow circle on the right on a green background", "a black square at the bottom on a white background"]
RUN = dict(steps=2, num_images=8, recipes=("int8-w",), export=False, batch_size=2, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIP (2 layers of width 32, 32-pixel images) with its processor, saved as safetensors."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS + ["a blue circle on a red background"]) + "\n")
    return path


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, tiny_clip_dir, prompt_file):
    """One process, in this one: shapes-sd, 8 prompts from a file, 2 steps, batches of 2, int8-w, CLIP and FID."""
    import diffquant as dq

    out = tmp_path_factory.mktemp("single") / "run"
    with one_thread():
        return dq.run(dq.RunConfig(prompt_source=str(prompt_file), clip_model=str(tiny_clip_dir), out=str(out), **RUN))


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory, tiny_clip_dir, prompt_file):
    """The same run through `accelerate launch --num_processes 2` (torchrun's launcher; gloo on CPU)."""
    from diffquant import RunResult

    out = tmp_path_factory.mktemp("two") / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "diffquant", "--quiet", "run", "--prompts", str(prompt_file), "--num-images", "8", "--steps", "2",
               "--recipes", "int8-w", "--no-export", "--batch-size", "2", "--device", "cpu",
               "--clip-model", str(tiny_clip_dir), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return RunResult.load(out), done


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as each process of the two-process run has (OMP_NUM_THREADS=1): float sums
    split over another thread count round differently, and a pixel can flip between runs that should
    make the same images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Every test here recomputes metrics of the one-thread runs (FID, CLIP score) and compares them
    closely: it computes them with the same single thread."""
    with one_thread():
        yield


def _pixels(path: Path) -> bytes:
    return np.asarray(Image.open(path)).tobytes()


def test_two_processes_make_the_same_images_and_metrics(single_run, two_process_run):
    two, done = two_process_run
    one = single_run
    assert two.evaluation.processes == 2 and one.evaluation.processes == 1
    # each process made its share: 8 images in batches of 2 -> 2 batches each, for each image set
    assert sorted((t.process, t.images, t.generated) for t in two.evaluation.throughput) == [
        (0, "baseline", 4), (0, "int8-w", 4), (1, "baseline", 4), (1, "int8-w", 4)]
    for label in ("baseline", "int8-w"):
        for k in range(8):
            relative = Path("images") / label / f"{k:03d}.png"
            assert _pixels(Path(one.out_dir) / relative) == _pixels(Path(two.out_dir) / relative), relative
    assert one.recipes["int8-w"].quality == two.recipes["int8-w"].quality
    assert one.recipes["int8-w"].scores == two.recipes["int8-w"].scores
    assert one.recipes["int8-w"].sqnr_db == two.recipes["int8-w"].sqnr_db
    assert one.baseline_scores == two.baseline_scores and one.baseline_shapeeval == two.baseline_shapeeval
    assert one.prompts == two.prompts == tuple(PROMPTS)  # the first 8 of the file's 9
    assert done.stdout.count("report:") == 1  # only the main process reports


def test_resume_generates_only_the_missing_images(single_run, tmp_path):
    import diffquant as dq

    out = tmp_path / "run"
    shutil.copytree(single_run.out_dir, out)
    folder = out / "images" / "int8-w"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if int(p.stem) < 4}
    for k in range(4, 8):  # half of the images: batches 2 and 3
        (folder / f"{k:03d}.png").unlink()
    config = dq.RunConfig.load(out / "config.json").replace(resume=True, out=str(out))
    with one_thread():
        resumed = dq.run(config)
    done = {t.images: (t.generated, t.skipped) for t in resumed.evaluation.throughput}
    assert done == {"baseline": (0, 8), "int8-w": (4, 4)}
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if int(p.stem) < 4} == kept
    for k in range(4, 8):
        relative = Path("images") / "int8-w" / f"{k:03d}.png"
        assert _pixels(out / relative) == _pixels(Path(single_run.out_dir) / relative)
    assert resumed.recipes["int8-w"].quality == single_run.recipes["int8-w"].quality


def test_resume_refuses_a_folder_of_other_settings(single_run, tmp_path):
    import diffquant as dq
    from diffquant.core.errors import DiffquantError

    out = tmp_path / "run"
    shutil.copytree(single_run.out_dir, out)
    config = dq.RunConfig.load(out / "config.json").replace(resume=True, out=str(out), steps=3)
    with pytest.raises(DiffquantError, match="other settings \\(steps\\)"):
        dq.run(config)


def test_clip_score_is_torchmetrics_on_the_saved_clip(single_run, tiny_clip_dir):
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    metric = CLIPScore(model_name_or_path=lambda: (CLIPModel.from_pretrained(tiny_clip_dir),
                                                   CLIPProcessor.from_pretrained(tiny_clip_dir)))
    for k, prompt in enumerate(PROMPTS):
        image = torch.from_numpy(np.asarray(Image.open(Path(single_run.out_dir) / "images" / "baseline" / f"{k:03d}.png")))
        metric.update([image.permute(2, 0, 1)], [prompt])
    scores = single_run.baseline_scores
    assert scores.n == 8 and scores.clip_score == pytest.approx(float(metric.compute()), rel=1e-5)
    assert single_run.recipes["int8-w"].scores.clip_score != scores.clip_score  # measured on its own images
    assert not any("CLIP score" in line for line in single_run.evaluation.missing)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_between_two_image_folders(single_run, tiny_clip_dir, tmp_path):
    """FID through torchmetrics on the CLIP image features (no Inception weights offline), against the
    baseline (reference FID) and against a folder of 'real' images; checked against scipy's formula."""
    from diffquant.evaluate.scoring import ClipImageFeatures, Scorer, load_clip
    from diffquant.evaluate.metrics import to_tensor

    evaluation = single_run.evaluation
    assert evaluation.fid_features.startswith(f"CLIP image embeddings of {tiny_clip_dir}")
    run_dir = Path(single_run.out_dir)
    real = tmp_path / "real"
    shutil.copytree(run_dir / "images" / "baseline", real)  # "real" images = the baseline's
    scorer = Scorer(run_dir, list(PROMPTS), str(tiny_clip_dir), str(real), torch.device("cpu"), shapes=False)
    _, baseline = scorer.baseline()
    quality, scores = scorer.image_set("int8-w")
    assert baseline.fid_real == pytest.approx(0, abs=1e-3) and baseline.n_real == 8
    assert quality.fid == pytest.approx(single_run.recipes["int8-w"].quality.fid, rel=1e-6)
    assert scores.fid_real == pytest.approx(quality.fid, rel=1e-6)  # same real images as the baseline

    model, processor = load_clip(str(tiny_clip_dir), torch.device("cpu"))
    features = ClipImageFeatures(model, processor.image_processor)

    def folder_features(label):
        paths = [run_dir / "images" / label / f"{k:03d}.png" for k in range(8)]
        return features(to_tensor([Image.open(p).convert("RGB") for p in paths])).double().numpy()

    expected = _frechet(folder_features("baseline"), folder_features("int8-w"))
    assert quality.fid == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_missing_weights_are_one_line_each_and_the_rest_runs(single_run, tmp_path):
    from diffquant.evaluate.scoring import Scorer

    scorer = Scorer(Path(single_run.out_dir), list(PROMPTS), str(tmp_path / "no-clip"), None, torch.device("cpu"),
                    shapes=True)
    assert [line.split(":")[0] for line in scorer.missing] == ["CLIP score not computed", "FID not computed"]
    assert all("\n" not in line for line in scorer.missing)
    shapeeval, scores = scorer.baseline()
    quality, _ = scorer.image_set("int8-w")
    assert quality.psnr_db == single_run.recipes["int8-w"].quality.psnr_db
    assert scores.clip_score is None and quality.fid is None and shapeeval == single_run.baseline_shapeeval


def test_overlapping_calibration_and_evaluation_prompts_are_named(caplog):
    from diffquant.workflow import calibration_overlap

    with caplog.at_level(logging.WARNING, logger="diffquant.workflow"):
        overlap = calibration_overlap(PROMPTS[:4], [PROMPTS[2], "a red square on a blue background", PROMPTS[0]])
    assert overlap == [PROMPTS[0], PROMPTS[2]]
    assert f"2 of the 4 evaluation prompts are also calibration prompts ('{PROMPTS[0]}'" in caplog.text
    caplog.clear()
    assert calibration_overlap(PROMPTS[:4], PROMPTS[4:]) == [] and caplog.text == ""


def test_a_w8a8_run_warns_when_its_calibration_prompts_are_evaluated(tmp_path, caplog):
    import diffquant as dq

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(PROMPTS[1:3]) + "\n")
    with caplog.at_level(logging.WARNING, logger="diffquant.workflow"):
        result = dq.run(dq.RunConfig(prompts=PROMPTS[:2], calib_prompts=str(calibration), calib_size=2, calib_steps=2,
                                     out=str(tmp_path / "run"), recipes=("w8a8-int8",), steps=2, export=False,
                                     device="cpu"))
    assert result.evaluation.calibration_overlap == (PROMPTS[1],)
    assert f"1 of the 2 evaluation prompts are also calibration prompts ('{PROMPTS[1]}')" in caplog.text
