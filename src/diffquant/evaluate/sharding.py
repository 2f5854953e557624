"""Evaluation at scale: the images of a run split between processes (accelerate), written as they are made,
and not made again when a run is resumed.

One code path for one process and many: `accelerate launch -m diffquant run ...` (or torchrun) starts N
processes, `processes()` returns accelerate's `PartialState` (a single process without a launcher).
The work is cut into the batches a single process would make (batch b holds images b*B .. b*B+B-1, image k
seeded `seed + k`), and the batches are split between processes: every image is made in the same batch
whatever the process count, so the images are bit-identical to a single-process run's, even where a
kernel's result depends on the batch size. The main process then reads the images back from disk and
measures them (`eval_metrics.py`), so the metrics are those of a single-process run too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from diffquant.core.artifacts import save_image
from diffquant.models.generation import generate
from diffquant.core.progress import is_quiet
from diffquant.core.results import Throughput

logger = logging.getLogger(__name__)


def processes(device: str = "auto"):
    """accelerate's `PartialState` for this run: the launcher's processes, or this one process alone.

    On a machine without a GPU (or with `device="cpu"`) the processes talk over gloo: accelerate only
    selects its multi-CPU mode when asked for the CPU."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def process_device(state, device: str) -> str:
    """The device this process loads the pipeline on: with several processes and `auto`, its own GPU."""
    if device == "auto" and state.num_processes > 1:
        return str(state.device)
    return device


def broadcast(state, value):
    """`value` of the main process, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(state, values: list) -> list:
    """Every process's `values`, concatenated in process order (on every process)."""
    if state.num_processes == 1:
        return list(values)
    from accelerate.utils import gather_object

    return gather_object(list(values))


def finish(state) -> None:
    """Close the process group (a process that exits with it open aborts). No barrier: after a failure the
    processes are not at the same point, and the launcher stops the others when one fails."""
    if state.num_processes > 1:
        state.destroy_process_group()


def image_path(label: str, k: int) -> Path:
    """Where image k of an image set lives, relative to the run folder."""
    return Path("images") / label / f"{k:03d}.png"


def on_disk(out_dir: Path, label: str, k: int) -> bool:
    """Image k of `label` is complete on disk. Images are written to a temporary name and renamed, so an
    image under its final name was written whole (a killed run leaves only hidden temporary files)."""
    return (out_dir / image_path(label, k)).is_file()


def batches(n: int, batch_size: int) -> list[range]:
    """The image indices of each batch, as a single process makes them."""
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


class _TotalProgress:
    """On the main process: images of the set on disk, made by all processes, with its rate and ETA."""

    def __init__(self, out_dir: Path, label: str, n: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.folder, self.n = out_dir / "images" / label, n
        self.bar = tqdm(total=n, desc=f"{label} (all processes)", disable=not enabled, leave=False, dynamic_ncols=True,
                        position=1)
        self.bar.update(self._count())

    def _count(self) -> int:
        return sum(1 for p in self.folder.glob("*.png") if not p.name.startswith(".")) if self.folder.is_dir() else 0

    def refresh(self) -> None:
        self.bar.update(self._count() - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def generate_share(state, pipe, prompts: list[str], out_dir: Path, label: str, gen: dict, batch_size: int,
                   record: Callable[[int], object] | None = None) -> Throughput:
    """Generate this process's share of an image set and save each image as soon as its batch is made.

    Batches whose images are all on disk are skipped (a resumed run); a batch with any image missing is
    made again whole, so that each image still comes from the batch a fresh run makes, and only its
    missing images are written.

    Args:
        state: from `processes()`.
        pipe: the pipeline (float, quantized, or ONNX Runtime's).
        prompts: every prompt of the set; image k uses `gen["seed"] + k`.
        out_dir: the run folder; images go to `images/<label>/<k>.png`.
        gen: `generate`'s seed, steps and guidance.
        batch_size: images per pipeline call (the same on every process).
        record: `record(batch_index)` gives a context manager that is active while that batch is made
            (the main process records the SQNR inputs of the first batches with it), or None.

    Returns:
        What this process made and how long it took.
    """
    from tqdm.auto import tqdm

    work = batches(len(prompts), batch_size)
    with state.split_between_processes(list(range(len(work)))) as mine:
        mine = list(mine)
    total = _TotalProgress(out_dir, label, len(prompts), enabled=state.is_main_process and state.num_processes > 1
                           and not is_quiet())
    bar = tqdm(total=sum(len(work[b]) for b in mine), disable=is_quiet(), leave=False, dynamic_ncols=True,
               desc=f"{label}" + (f" [process {state.process_index}/{state.num_processes}]"
                                  if state.num_processes > 1 else ""), position=0)
    generated = skipped = 0
    started = time.perf_counter()
    try:
        for b in mine:
            ks = work[b]
            missing = [k for k in ks if not on_disk(out_dir, label, k)]
            skipped += len(ks) - len(missing)
            if missing:
                with record(b) if record is not None else _nothing():
                    images = generate(pipe, prompts[ks.start:ks.stop], seed=gen["seed"] + ks.start,
                                      steps=gen["steps"], guidance=gen["guidance"], batch_size=batch_size,
                                      height=gen.get("height"), width=gen.get("width"), frames=gen.get("frames"),
                                      show_progress=False)
                for k in missing:
                    save_image(images[k - ks.start], out_dir / image_path(label, k))
                generated += len(missing)
            bar.update(len(ks))
            total.refresh()
    finally:
        bar.close()
        total.close()
    seconds = round(time.perf_counter() - started, 3)
    if skipped:
        logger.info("%s: %d images already on disk were not generated again", label, skipped)
    return Throughput(process=state.process_index, images=label, generated=generated, skipped=skipped,
                      seconds=seconds)


@contextmanager
def _nothing():
    yield None


def generate_set(state, pipe, prompts: list[str], out_dir: Path, label: str, gen: dict, batch_size: int,
                 record: Callable[[int], object] | None = None) -> list[Throughput]:
    """`generate_share` on every process, then wait for all: every process returns the throughputs of all
    processes, and the main process checks that every image of the set is on its disk (a multi-node run
    needs `--out` on a filesystem that every node shares)."""
    mine = generate_share(state, pipe, prompts, out_dir, label, gen, batch_size, record)
    everyone = [Throughput(**t) for t in gather(state, [asdict(mine)])]
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [k for k in range(len(prompts)) if not on_disk(out_dir, label, k)]
        if missing:
            from diffquant.core.errors import DiffquantError

            raise DiffquantError(f"{len(missing)} {label} images made by other processes are not in {out_dir} "
                                 f"(first: {image_path(label, missing[0])}): on several machines, pass an --out on "
                                 "a filesystem that all of them share")
    return everyone


def record_batches(records_wanted: int, calls_per_batch: int) -> int:
    """How many first batches hold `records_wanted` recorded denoiser calls."""
    return math.ceil(records_wanted / max(calls_per_batch, 1))
