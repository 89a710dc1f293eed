"""A run killed with SIGKILL half way loses nothing: running the same command again finishes the job with exactly
one manifest row per input, every ok output decodes, nothing is half-written, and only unfinished work is redone."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import hostile_corpus
from stylecore.checkpoint import save_model
from stylecore.model import UNet, UNetConfig

REPO = Path(__file__).resolve().parent.parent
IMAGES = 240


def stylize_command(source: Path, destination: Path, model: Path, home: Path) -> list[str]:
    return [sys.executable, "-m", "stylize.cli", "run", str(source), str(destination), "--model", str(model),
            "--home", str(home), "--device", "cpu", "--quiet", "--shard-size", "80", "--batch-size", "4",
            "--journal-seconds", "0.2"]


@contextlib.contextmanager
def killed_if_this_fails(process: subprocess.Popen, group: bool = False):
    """A failing check must not leave the run it watches going on after the test."""
    try:
        yield
    except BaseException:
        if process.poll() is None:
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()
        raise


def rows_in(paths: list, read_bytes) -> list[dict]:
    """Manifest rows of these Parquet files, read while a run may still be writing them."""
    rows = []
    for path in paths:
        try:
            rows += pq.read_table(pa.BufferReader(read_bytes(path))).to_pylist()
        except FileNotFoundError:  # a running shard replaced this journal file since the listing
            pass
    return rows


def journaled_rows(destination: Path) -> list[dict]:
    """Rows an interrupted run left: finished shards' parts and unfinished shards' journals."""
    parts = destination / "_manifest_parts"
    files = list(parts.glob("*.parquet")) + list(parts.glob("*.journal/*.parquet")) if parts.exists() else []
    return rows_in(files, Path.read_bytes)


def test_kill_9_mid_run_then_the_same_command_finishes_the_job(tmp_path):
    source, destination, home = tmp_path / "in", tmp_path / "out", tmp_path / "home"
    hostile_corpus.write_photos(source, IMAGES)
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", UNet(UNetConfig()).eval(), {"name": "default-untrained"})
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    first = subprocess.Popen(stylize_command(source, destination, model, home), cwd=tmp_path, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    with killed_if_this_fails(first):
        while time.monotonic() < deadline and first.poll() is None and len(journaled_rows(destination)) < IMAGES // 4:
            time.sleep(0.05)
        assert first.poll() is None, f"the run ended before it could be killed: {first.communicate()}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (destination / "manifest.parquet").exists()
    done_before = {row["input_uri"] for row in journaled_rows(destination) if row["status"] == "ok"}
    assert 0 < len(done_before) < IMAGES

    again = subprocess.run(stylize_command(source, destination, model, home), cwd=tmp_path, env=environment,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr

    rows = pq.read_table(destination / "manifest.parquet").to_pylist()
    inputs = sorted(str(path) for path in source.rglob("*.jpg"))
    assert sorted(row["input_uri"] for row in rows) == inputs, "exactly one row per input"
    skipped = {row["input_uri"] for row in rows if row["status"] == "skipped"}
    redone = [row for row in rows if row["status"] == "ok"]
    assert skipped == done_before, "what the killed run finished is not redone"
    assert len(redone) == IMAGES - len(done_before), "everything else is done once"
    assert f"{len(done_before)} already done" in again.stdout
    for row in rows:
        with Image.open(row["output_uri"]) as image:
            image.load()
            assert image.size == (96, 64)
    leftovers = [path for path in destination.rglob("*") if path.name.endswith(".partial") or ".journal" in str(path)]
    assert leftovers == []
    print(f"killed after {len(done_before)} of {IMAGES} images; the rerun redid {len(redone)}")


def test_kill_9_of_a_bucket_run_on_gcs_then_the_same_command_finishes_the_job(gcs_emulator, tmp_path):
    """The same through the stylize-bucket flow (its Prefect engine and ephemeral server die with it)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(**gcs_emulator)
    prefix = f"photos/kill-{tmp_path.name}"
    images = 320
    for index in range(images):
        fs.pipe_file(f"{prefix}/in/set{index % 4}/{index:04}.jpg",
                     hostile_corpus.encoded(hostile_corpus.photo((96, 64), seed=index), "JPEG"))
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", UNet(UNetConfig()).eval(), {"name": "default-untrained"})
    command = [sys.executable, "-m", "stylize.cli", "run", f"gs://{prefix}/in", f"gs://{prefix}/out",
               "--model", str(model), "--home", str(tmp_path / "home"), "--device", "cpu", "--quiet",
               "--shard-size", "80", "--batch-size", "4", "--journal-seconds", "0.2",
               *[f"--storage-option={key}={value}" for key, value in gcs_emulator.items()]]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                   "PREFECT_HOME": str(tmp_path / "prefect")}

    def finished_rows() -> list[dict]:
        fs.invalidate_cache()
        paths = fs.glob(f"{prefix}/out/_manifest_parts/*.parquet") + \
            fs.glob(f"{prefix}/out/_manifest_parts/*.journal/*.parquet")
        return rows_in(paths, fs.cat_file)

    first = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 180
    with killed_if_this_fails(first, group=True):
        while time.monotonic() < deadline and first.poll() is None and len(finished_rows()) < images // 4:
            time.sleep(0.1)
        assert first.poll() is None, f"the run ended before it could be killed: {first.communicate()}"
    os.killpg(first.pid, signal.SIGKILL)  # the CLI and its ephemeral Prefect server, as when a worker dies
    first.wait()
    done_before = {row["input_uri"] for row in finished_rows() if row["status"] == "ok"}
    assert 0 < len(done_before) < images
    assert not fs.exists(f"{prefix}/out/manifest.parquet")

    again = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=400,
                           start_new_session=True)
    assert again.returncode == 0, again.stderr[-3000:]
    fs.invalidate_cache()
    rows = pq.read_table(pa.BufferReader(fs.cat_file(f"{prefix}/out/manifest.parquet"))).to_pylist()
    assert sorted(row["input_uri"] for row in rows) == sorted(f"gs://{path}" for path in fs.find(f"{prefix}/in"))
    assert {row["input_uri"] for row in rows if row["status"] == "skipped"} == done_before
    assert sum(row["status"] == "ok" for row in rows) == images - len(done_before)
    for row in rows[:: images // 16]:
        with Image.open(io.BytesIO(fs.cat_file(row["output_uri"]))) as image:
            image.load()
    assert not fs.glob(f"{prefix}/out/_manifest_parts/*.journal/*")
    print(f"flow run killed after {len(done_before)} of {images} images; the rerun redid {images - len(done_before)}")


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def start_with_workers(tmp_path: Path) -> tuple[subprocess.Popen, list[str]]:
    source, destination, home = tmp_path / "in", tmp_path / "out", tmp_path / "home"
    hostile_corpus.write_photos(source, IMAGES)
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", UNet(UNetConfig()).eval(), {"name": "default-untrained"})
    command = [*stylize_command(source, destination, model, home), "--workers", "2"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    with killed_if_this_fails(run):
        while time.monotonic() < deadline and run.poll() is None and len(journaled_rows(destination)) < IMAGES // 8:
            time.sleep(0.05)
        assert run.poll() is None, f"the run ended before it could be stopped: {run.communicate()}"
    return run, command


def test_workers_of_a_run_killed_outright_stop_by_themselves_and_the_same_command_finishes(tmp_path):
    run, command = start_with_workers(tmp_path)
    workers = children_of(run.pid)
    assert workers, "the run has worker processes"
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(running(pid) for pid in workers):
        time.sleep(0.2)
    left = [pid for pid in workers if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers went on after their parent was killed"
    done_before = {row["input_uri"] for row in journaled_rows(tmp_path / "out") if row["status"] == "ok"}
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    again = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(rows) == IMAGES and {row["input_uri"] for row in rows if row["status"] == "skipped"} == done_before


def test_sigterm_to_a_run_with_workers_stops_it_without_finishing_the_queued_shards(tmp_path):
    # What a scheduler or `kill` sends, to the parent alone: it must stop the workers' shards as Ctrl-C would.
    run, command = start_with_workers(tmp_path)
    run.send_signal(signal.SIGTERM)
    with killed_if_this_fails(run, group=False):
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr.decode()
    done = {row["input_uri"] for row in journaled_rows(tmp_path / "out") if row["status"] == "ok"}
    assert 0 < len(done) < IMAGES, "the run went on through every shard after SIGTERM"
    assert not [path for path in (tmp_path / "out").rglob("*.partial")]
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert {row["input_uri"] for row in rows if row["status"] == "skipped"} == done


def test_ctrl_c_while_the_workers_start_stops_the_run_with_one_line(tmp_path):
    # A terminal's Ctrl-C reaches the workers too; while they still imported torch, each printed its traceback.
    source, home = tmp_path / "in", tmp_path / "home"
    hostile_corpus.write_photos(source, 160)  # two shards: two workers
    model = save_model(tmp_path / "model", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "m"})
    command = [*stylize_command(source, tmp_path / "out", model, home), "--workers", "2"]
    restored = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                                      "os.execv(sys.argv[1], sys.argv[1:])"]  # a background test run ignores SIGINT
    run = subprocess.Popen([*restored, *command], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    with killed_if_this_fails(run, group=True):
        deadline = time.monotonic() + 120
        while len(children_of(run.pid)) < 3 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the resource tracker and the two workers, just started
        assert run.poll() is None, run.communicate()
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and stderr.strip().splitlines() == [
        "stylize: interrupted; run the same command again to resume"], stderr
