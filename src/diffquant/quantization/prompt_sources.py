"""Calibration prompt sources: a text or tabular file, a dataset folder, or a Hugging Face dataset id.

Every source gives the first `size` prompts in its own order, after dropping empty and duplicate
captions. Tabular sources are read with `datasets` in streaming mode, so a large file or a Hub
dataset is read only as far as the prompts asked for.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

from diffquant.core.errors import DiffquantError

logger = logging.getLogger(__name__)
CAPTION_COLUMNS = ("caption", "TEXT", "text", "prompt")  # COCO/CC, LAION, generic, prompt lists
FILE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".parquet": "parquet"}
FILE_SUFFIXES = {".txt", ".json", *FILE_BUILDERS}
# What the prompts are for, and the CLI options that name their source, column and split: error messages name them.
ROLES = {"calibration": ("calibration", "--calib-prompts", "--calib-column", "--calib-split"),
         "evaluation": ("evaluation", "--prompts", "--prompts-column", "--prompts-split")}
_role: ContextVar[tuple[str, str, str, str]] = ContextVar("prompt_role", default=ROLES["calibration"])


def load_prompts(source: str | Path | None, size: int, column: str | None = None, split: str = "train",
                 seed: int = 0, default: Callable[[int, int], list[str]] | None = None,
                 role: str = "calibration") -> list[str]:
    """Load up to `size` calibration (or evaluation) prompts, dropping empty and duplicate ones (first occurrence kept).

    Args:
        source: None (use `default`), a .txt/.csv/.jsonl/.json/.parquet file, a folder written by
            `Dataset.save_to_disk` or holding data files in Hub layout, or a Hugging Face dataset id.
        size: how many prompts to return at most; fewer are returned (with a warning) if the
            source holds fewer.
        column: the prompt column of a tabular source; None picks the first of caption, TEXT,
            text, prompt (exact names first, then ignoring case).
        split: the split of a dataset folder or Hub dataset.
        seed: passed to `default`; file and dataset order is kept as is.
        default: `default(size, seed)` gives the prompts when `source` is None.
        role: "calibration" or "evaluation": what error messages call the prompts and which options they name.

    Returns:
        The prompts, stripped, in source order.
    """
    token = _role.set(ROLES[role])
    try:
        return _load(source, size, column, split, seed, default)
    finally:
        _role.reset(token)


def _load(source, size: int, column: str | None, split: str, seed: int, default) -> list[str]:
    what, flag, _, _ = _role.get()
    if size < 1:
        raise DiffquantError(f"{what} size must be at least 1, got {size}")
    if source is None:
        if default is None:
            raise DiffquantError(f"{what} needs prompts: pass {flag} with a .txt/.csv/.jsonl/.parquet file, "
                                 "a dataset folder or a Hugging Face dataset id")
        return default(size, seed)
    path = Path(source).expanduser()
    if path.is_file():
        prompts = _from_file(path, size, column)
    elif path.is_dir():
        prompts = _from_folder(path, size, column, split)
    elif str(source).startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES:
        raise DiffquantError(f"{what} prompt file {source} does not exist")
    else:
        prompts = _from_hub(str(source), size, column, split)
    if not prompts:
        raise DiffquantError(f"no prompts in {source} after dropping empty and duplicate captions")
    if len(prompts) < size:
        logger.warning("%s holds %d unique non-empty prompts, fewer than the %d asked for", source, len(prompts), size)
    return prompts


def _unique(values: Iterable, size: int) -> list[str]:
    """The first `size` distinct non-empty strings of `values`, stripped; non-strings count as empty."""
    seen: dict[str, None] = {}  # an ordered set
    for value in values:
        if isinstance(value, str) and (value := value.strip()) and value not in seen:
            seen[value] = None
            if len(seen) == size:
                break
    return list(seen)


def _pick_column(names: list[str], column: str | None, source) -> str:
    if column is not None:
        if column in names:
            return column
        raise DiffquantError(f"{source} has no column {column!r}; its columns are {names}: "
                             f"pass {_role.get()[2]} with one of them")
    lowered = {name.lower(): name for name in reversed(names)}  # reversed: the first spelling wins
    for candidate in CAPTION_COLUMNS:
        if candidate in names:
            return candidate
    for candidate in CAPTION_COLUMNS:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    raise DiffquantError(f"{source} has no caption column ({', '.join(CAPTION_COLUMNS)}); its columns are "
                         f"{names}: pass {_role.get()[2]} to name the prompt column")


def _column_values(dataset, column: str | None, source) -> Iterator:
    """The prompt column of a `Dataset` or `IterableDataset`, read lazily."""
    names = dataset.column_names
    if names is None:  # a streamed csv/json only knows its columns once a row is read
        rows = iter(dataset)
        first = next(rows, None)
        if first is None:
            return iter(())
        name = _pick_column(list(first), column, source)
        return (row[name] for row in itertools.chain([first], rows))
    name = _pick_column(list(names), column, source)
    # selecting the column first keeps image columns of caption datasets from being decoded
    return (row[name] for row in dataset.select_columns([name]))


def _pick_split(loaded, split: str, source):
    if not isinstance(loaded, dict):  # DatasetDict and IterableDatasetDict are dicts of splits
        return loaded
    if split not in loaded:
        raise DiffquantError(f"{source} has no split {split!r}; its splits are {list(loaded)}: "
                             f"pass {_role.get()[3]} with one of them")
    return loaded[split]


def _utf8_text(path: Path) -> str:
    """The text of `path`, or one line naming the file and the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DiffquantError(f"{_role.get()[0]} prompt file {path} is not UTF-8 text: byte {exc.start} (0x{data[exc.start]:02x}) "
                             "cannot be decoded; save it as UTF-8 (e.g. iconv -t UTF-8)") from None


def _from_file(path: Path, size: int, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _unique(_utf8_text(path).splitlines(), size)
    if suffix == ".json":
        data = json.loads(_utf8_text(path))
        if isinstance(data, list) and all(isinstance(item, str) for item in data):
            return _unique(data, size)
        if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
            name = _pick_column(list(data[0]), column, path)
            return _unique((item.get(name) for item in data), size)
        raise DiffquantError(f"{path} must hold a JSON list of strings or of objects")
    if suffix not in FILE_BUILDERS:
        raise DiffquantError(f"{_role.get()[0]} prompt file {path} has an unknown type: use .txt, .csv, .jsonl, "
                             ".json or .parquet")
    import datasets

    if suffix != ".parquet":  # text formats: the decoder's error, not pandas', names the byte
        _utf8_text(path)
    try:
        dataset = datasets.load_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", streaming=True)
        return _unique(_column_values(dataset, column, path), size)
    except DiffquantError:
        raise
    except Exception as exc:  # parser errors of pandas/pyarrow: name the file, keep the cause
        raise DiffquantError(f"cannot read {path}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _from_folder(path: Path, size: int, column: str | None, split: str) -> list[str]:
    import datasets

    saved = any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), streaming=True)
        return _unique(_column_values(_pick_split(loaded, split, path), column, path), size)
    except DiffquantError:
        raise
    except Exception as exc:  # e.g. a folder without data files
        raise DiffquantError(f"cannot read {path} as a dataset: {type(exc).__name__}: {_first_line(exc)}") from exc


def _from_hub(dataset_id: str, size: int, column: str | None, split: str) -> list[str]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, streaming=True)
        return _unique(_column_values(_pick_split(loaded, split, dataset_id), column, dataset_id), size)
    except DiffquantError:
        raise
    except Exception as exc:  # network, auth and Hub errors come from several libraries: report one line
        raise _hub_error(dataset_id, exc) from None


def _hub_error(dataset_id: str, exc: Exception) -> DiffquantError:
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    message = str(exc)
    if isinstance(exc, GatedRepoError) or "gated" in message.lower():
        what = "is gated: accept its terms on its Hub page"
    elif isinstance(exc, (RepositoryNotFoundError, DatasetNotFoundError, FileNotFoundError)):
        what = "was not found on the Hub (a wrong id, a private dataset or a withdrawn one)"
    elif constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        what = "cannot be reached: the Hub is offline (HF_HUB_OFFLINE=1) and it is not cached"
    elif isinstance(exc, (ConnectionError, TimeoutError)) or "connect" in message.lower():
        what = "cannot be reached: no connection to the Hub"
    else:
        what = f"could not be loaded ({type(exc).__name__}: {_first_line(exc)})"
    token = "no Hugging Face token is set (HF_TOKEN or `hf auth login`)" if get_token() is None \
        else "a Hugging Face token is set"
    role, flag = _role.get()[:2]
    alternatives = f"pass a local .txt/.csv/.jsonl/.parquet file or another dataset id to {flag}"
    return DiffquantError(f"{role} dataset {dataset_id} {what}; {token}; {alternatives}")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
