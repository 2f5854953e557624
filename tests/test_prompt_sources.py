import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError

from diffquant.core.errors import DiffquantError
from diffquant.quantization.prompt_sources import load_prompts


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_txt_drops_blank_and_duplicate_lines_in_order(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n   \nblue square\na red circle\n  green triangle  \nlast one\n")
    assert load_prompts(path, 3) == ["a red circle", "blue square", "green triangle"]
    assert load_prompts(str(path), 10) == ["a red circle", "blue square", "green triangle", "last one"]


def test_csv_caption_column_is_detected(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text("url,caption\nu1,a cat\nu2,\nu3,a dog\nu4,a cat\nu5,a bird\n")
    assert load_prompts(path, 3) == ["a cat", "a dog", "a bird"]


def test_jsonl_text_column_drops_nulls_and_numbers(tmp_path):
    path = _write_jsonl(tmp_path / "laion.jsonl", [{"URL": "u", "TEXT": t} for t in ["one", None, "two", "", "one"]])
    assert load_prompts(path, 5) == ["one", "two"]
    numbers = _write_jsonl(tmp_path / "mixed.jsonl", [{"text": 3}, {"text": "three"}])
    assert load_prompts(numbers, 5) == ["three"]


def test_parquet_text_column(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["x", "y", "x"]}), path)
    assert load_prompts(path, 4) == ["x", "y"]


def test_json_list_of_strings_and_objects_with_case_insensitive_column(tmp_path):
    strings = tmp_path / "list.json"
    strings.write_text(json.dumps(["p1", "", "p2", "p1"]))
    assert load_prompts(strings, 4) == ["p1", "p2"]
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([{"Prompt": "q1", "n": 1}, {"Prompt": "q2", "n": 2}]))
    assert load_prompts(objects, 4) == ["q1", "q2"]


def test_column_override_and_missing_column_lists_columns(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("text,caption,alt\ntext one,cap one,alt one\ntext two,cap two,alt two\n")
    assert load_prompts(path, 2) == ["cap one", "cap two"]  # caption comes before text
    assert load_prompts(path, 2, column="alt") == ["alt one", "alt two"]
    with pytest.raises(DiffquantError) as error:
        load_prompts(path, 2, column="nope")
    assert all(word in str(error.value) for word in ("'nope'", "caption", "alt", "--calib-column"))
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("url,width\nu,3\n")
    with pytest.raises(DiffquantError, match="--calib-column") as error:
        load_prompts(unknown, 2)
    assert "url" in str(error.value) and "width" in str(error.value)


def test_saved_dataset_folder_and_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"caption": ["s1", "s2", "s1", "s3"]}).save_to_disk(tmp_path / "single")
    assert load_prompts(tmp_path / "single", 3) == ["s1", "s2", "s3"]
    DatasetDict({"train": Dataset.from_dict({"prompt": ["t1"]}),
                 "validation": Dataset.from_dict({"prompt": ["v1", "v2"]})}).save_to_disk(tmp_path / "dict")
    assert load_prompts(tmp_path / "dict", 5, split="validation") == ["v1", "v2"]
    with pytest.raises(DiffquantError, match="validation") as error:
        load_prompts(tmp_path / "dict", 5, split="test")
    assert "--calib-split" in str(error.value)


def test_hub_layout_folder(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"TEXT": ["h1", "h2", "h3"]}), tmp_path / "data" / "train-00000-of-00001.parquet")
    assert load_prompts(tmp_path, 2) == ["h1", "h2"]


def test_dataset_id_offline_names_the_alternatives_in_one_line(monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(DiffquantError) as error:
        load_prompts("laion/laion400m", 4)
    message = str(error.value)
    assert "\n" not in message and error.value.__suppress_context__
    assert "laion/laion400m" in message and "offline" in message
    assert "no Hugging Face token is set" in message
    assert ".txt" in message and "another dataset id" in message


@pytest.mark.parametrize("error_type, expected", [(GatedRepoError, "is gated"), (DatasetNotFoundError, "not found")])
def test_dataset_id_gated_or_missing(monkeypatch, error_type, expected):
    def refuse(*args, **kwargs):
        raise error_type("403 gated" if error_type is GatedRepoError else "no such dataset")

    monkeypatch.setattr("datasets.load_dataset", refuse)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_x")
    with pytest.raises(DiffquantError, match=expected) as error:
        load_prompts("user/name", 4)
    assert "a Hugging Face token is set" in str(error.value) and ".parquet" in str(error.value)


def test_none_uses_the_default_or_asks_for_a_source():
    calls = []

    def default(size, seed):
        calls.append((size, seed))
        return [f"shape {i}" for i in range(size)]

    assert load_prompts(None, 3, seed=7, default=default) == ["shape 0", "shape 1", "shape 2"]
    assert calls == [(3, 7)]
    with pytest.raises(DiffquantError, match="dataset id"):
        load_prompts(None, 3)


def test_no_prompts_is_an_error_and_too_few_warns(tmp_path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(DiffquantError, match="no prompts in"):
        load_prompts(empty, 3)
    few = tmp_path / "few.txt"
    few.write_text("only\n")
    with caplog.at_level(logging.WARNING, logger="diffquant.quantization.prompt_sources"):
        assert load_prompts(few, 3) == ["only"]
    assert "fewer than the 3" in caplog.text


@pytest.mark.parametrize("name", ["missing.txt", "./nowhere", "prompts/missing.parquet"])
def test_missing_file_is_an_error(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffquantError, match="does not exist"):
        load_prompts(name, 3)


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.json", "prompts.csv", "prompts.jsonl"])
def test_a_prompt_file_that_is_not_utf8_names_the_file_and_the_byte(name, tmp_path, capsys):
    from diffquant.cli.main import main

    path = tmp_path / name
    path.write_bytes("a red circle\n".encode() + "une forme bleue sur fond vert\n".encode("latin-1") + b"caf\xe9\n")
    with pytest.raises(DiffquantError, match=rf"calibration prompt file {path} is not UTF-8 text: byte 46 \(0xe9\)"):
        load_prompts(path, 8)
    assert main(["--quiet", "quantize", "--recipe", "w8a8-int8", "--calib-prompts", str(path),
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path} is not UTF-8 text: byte 46" in err[0] and "Traceback" not in err[0]
