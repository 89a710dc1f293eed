"""A run killed with SIGKILL half way loses nothing: running the same command again finishes the job with exactly
one manifest row per input, every ok output decodes, nothing is half-written, and only unfinished work is redone."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def journaled_rows(destination: Path) -> list[dict]:
    """Rows an interrupted run left: finished shards' parts and unfinished shards' journals."""
    parts = destination / "_manifest_parts"
    files = list(parts.glob("*.parquet")) + list(parts.glob("*.journal/*.parquet")) if parts.exists() else []
    return [row for path in files for row in pq.read_table(io.BytesIO(path.read_bytes())).to_pylist()]


def test_kill_9_mid_run_then_the_same_command_finishes_the_job(tmp_path):
    source, destination, home = tmp_path / "in", tmp_path / "out", tmp_path / "home"
    for index in range(IMAGES):
        path = source / f"set{index % 4}" / f"photo_{index:04}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hostile_corpus.encoded(hostile_corpus.photo((96, 64), seed=index), "JPEG"))
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", UNet(UNetConfig()).eval(), {"name": "default-untrained"})
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    first = subprocess.Popen(stylize_command(source, destination, model, home), cwd=tmp_path, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
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
