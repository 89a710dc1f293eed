"""Shards in worker processes (`stylize run --workers N`): the same outputs and rows as one process, progress
for every image, and a failing shard fails the run without losing the others' work."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from stylecore.model import UNet, UNetConfig
from tasks import manifest
from tasks.bucket import AUTO_WORKERS_MIN_IMAGES, MANIFEST_NAME, ShardOptions, auto_workers, list_shards, run_shards
from tasks.storage import Location
from tasks.workers import ShardWorkers, WorkerDied
from tests.hostile_corpus import make_read_only, make_writable

PHOTOS = Path(__file__).resolve().parent.parent / "stylecore" / "assets" / "photos"


def small_photos(folder: Path, keys: list[str]) -> None:
    sources = sorted(PHOTOS.glob("*.jpg"))
    for index, key in enumerate(keys):
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.fit(Image.open(sources[index % len(sources)]).convert("RGB"), (40 + index, 32)).save(path, "JPEG")


def model() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=4, depth=2)).eval()


def rows_by_input(destination: Path, root: Path) -> dict[str, dict]:
    table = manifest.read_table(Location(str(destination / MANIFEST_NAME)))
    return {Path(row["input_uri"]).relative_to(root).as_posix(): row for row in table.to_pylist()}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"), dtype=np.int16)


class WorkerKiller:
    """A progress callback that SIGKILLs one worker process the first time it is called, as the kernel's
    out-of-memory killer would once work is under way."""

    def __init__(self):
        self.killed: list[int] = []

    def __call__(self, count: int) -> None:
        if not self.killed:
            victim = multiprocessing.active_children()[0]
            os.kill(victim.pid, signal.SIGKILL)
            self.killed.append(victim.pid)


def test_worker_processes_give_the_outputs_and_rows_of_one_process(tmp_path):
    keys = [f"set{index % 3}/photo{index}.jpg" for index in range(7)]
    small_photos(tmp_path / "in", keys)
    source = Location(str(tmp_path / "in"))
    alone = run_shards(source, Location(str(tmp_path / "alone")), {"m": model()}, ShardOptions(batch_size=2), 3)
    progress: list[int] = []
    shared = run_shards(source, Location(str(tmp_path / "shared")), {"m": model()},
                        ShardOptions(batch_size=2, workers=2), 3, on_progress=progress.append)

    assert alone["counts"] == shared["counts"] == {"ok": 7, "skipped": 0, "error": 0}
    assert shared["shards"] == 3 and sum(progress) == 7
    rows = rows_by_input(tmp_path / "shared", tmp_path / "in")
    assert sorted(rows) == sorted(keys)
    for key in keys:
        assert (rows[key]["width"], rows[key]["height"]) == Image.open(tmp_path / "in" / key).size
        # the same picture: one process's threads and another's may round a float differently
        difference = np.abs(pixels(tmp_path / "alone" / key) - pixels(tmp_path / "shared" / key))
        assert difference.mean() < 0.5, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("given_on", ["cuda", "cpu"])
def test_worker_processes_share_one_gpu(tmp_path, given_on):
    """Models given on the CPU with device="cuda" (how `stylize run` and the stylize-bucket flow start their
    workers) stay there: this process holds nothing on the GPU."""
    keys = [f"photo{index}.jpg" for index in range(7)]
    small_photos(tmp_path / "in", keys)
    source = Location(str(tmp_path / "in"))
    alone = run_shards(source, Location(str(tmp_path / "alone")), {"m": model().cuda()}, ShardOptions(batch_size=2), 3)
    models = {"m": model().to(given_on)}
    before = torch.cuda.memory_allocated()
    shared = run_shards(source, Location(str(tmp_path / "shared")), models, ShardOptions(batch_size=2, workers=2), 3,
                        device="cuda")
    assert alone["counts"] == shared["counts"] == {"ok": 7, "skipped": 0, "error": 0} and shared["workers"] == 2
    assert torch.cuda.memory_allocated() == before
    assert next(models["m"].parameters()).device.type == given_on
    for key in keys:
        difference = np.abs(pixels(tmp_path / "alone" / key) - pixels(tmp_path / "shared" / key))
        assert difference.mean() < 0.5, key


def test_a_failing_shard_fails_the_run_and_the_other_shards_keep_their_work(tmp_path):
    keys = ["a/1.jpg", "b/2.jpg", "c/3.jpg", "d/4.jpg"]
    small_photos(tmp_path / "in", keys)
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    (tmp_path / "out" / "b").mkdir(parents=True)
    if not make_read_only(tmp_path / "out" / "b"):  # the write of b/2.jpg fails
        pytest.skip("this system cannot make a folder read-only for this user (no chattr)")
    options = ShardOptions(workers=2)
    try:
        with pytest.raises(OSError):
            run_shards(source, destination, {"m": model()}, options, shard_size=1)
    finally:
        make_writable(tmp_path / "out" / "b")
    written = {path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out").glob("?/*.jpg")}
    assert "b/2.jpg" not in written and written  # the shards that ran kept their outputs

    again = run_shards(source, destination, {"m": model()}, options, shard_size=1)
    assert again["counts"]["ok"] + again["counts"]["skipped"] == 4 and again["counts"]["error"] == 0
    assert again["redone"] == 4 - len(written)  # what was written before is not done twice


def test_a_killed_worker_stops_the_run_with_a_clear_error_and_a_rerun_finishes_it(tmp_path):
    keys = [f"photo{index:02}.jpg" for index in range(12)]
    small_photos(tmp_path / "in", keys)
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    kill_a_worker = WorkerKiller()

    with pytest.raises(WorkerDied, match="run the same command again"):
        run_shards(source, destination, {"m": model()}, ShardOptions(workers=2), 1, on_progress=kill_a_worker)
    again = run_shards(source, destination, {"m": model()}, ShardOptions(workers=2), 1)
    assert again["counts"]["ok"] + again["counts"]["skipped"] == 12 and again["counts"]["error"] == 0


def test_after_a_worker_dies_the_same_workers_start_afresh_and_a_retried_shard_finishes(tmp_path):
    """What lets the stylize-bucket flow retry a shard whose worker was killed."""
    small_photos(tmp_path / "in", [f"photo{index:02}.jpg" for index in range(12)])
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    shards = list_shards(source, 1)
    kill_a_worker = WorkerKiller()
    options = ShardOptions(workers=2)
    with ShardWorkers({"m": model()}, 2) as workers:
        futures = [workers.submit(shard, source, destination, options, kill_a_worker) for shard in shards]
        lost = [shard for shard, future in zip(shards, futures) if future.exception() is not None]
        assert kill_a_worker.killed and lost, "the kill came after every shard had finished"
        assert all(isinstance(futures[shards.index(shard)].exception(), BrokenProcessPool) for shard in lost)
        retried = [workers.run(shard, source, destination, options) for shard in lost]
    assert all(result.counts["ok"] + result.counts["skipped"] == 1 for result in retried)
    assert {path.name for path in (tmp_path / "out").glob("*.jpg")} == {f"photo{index:02}.jpg" for index in range(12)}


def test_a_failing_progress_callback_does_not_stop_progress_for_other_shards(tmp_path):
    small_photos(tmp_path / "in", [f"photo{index}.jpg" for index in range(6)])
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    first, second = list_shards(source, 3)
    counted: list[int] = []

    def broken_progress_bar(count: int) -> None:
        raise ValueError("the terminal went away")

    with ShardWorkers({"m": model()}, 1) as workers:  # one worker: the first shard reports first
        futures = [workers.submit(first, source, destination, ShardOptions(), broken_progress_bar),
                   workers.submit(second, source, destination, ShardOptions(), counted.append)]
        results = [future.result() for future in futures]
    assert [result.counts["ok"] for result in results] == [3, 3]
    assert sum(counted) == 3


def test_workers_take_their_share_of_the_cores_and_memory():
    alone, quarter = ShardOptions().engine_config(), ShardOptions(workers=4).engine_config()
    assert alone.memory_fraction == 1 and alone.cpu_threads == 0  # 0: every core
    assert quarter.memory_fraction == 0.25 and quarter.cpu_threads >= 1
    with pytest.raises(ValueError):
        ShardOptions(workers=-1)


def test_automatic_workers_start_only_for_runs_worth_their_start():
    assert auto_workers(AUTO_WORKERS_MIN_IMAGES - 1) == 1
    assert auto_workers(AUTO_WORKERS_MIN_IMAGES) >= 2
