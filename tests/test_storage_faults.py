"""Storage that fails during a run: the run completes through retries, or fails with a clear summary and heals when
run again; outputs written before the fault stay valid, and the manifest ends with exactly one row per input.
(Intermittent write failures are in test_stylize_bucket_flow.py.)"""

import io
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import hostile_corpus
from flows.stylize_bucket import stylize_bucket
from stylecore.checkpoint import save_model
from stylecore.model import UNet, UNetConfig
from stylize.cli import main
from tasks import manifest
from tasks.models import save_model_to
from tasks.storage import Location
from test_crash_recovery import journaled_rows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RestartableEmulator:
    """A GCS emulator that keeps its objects on disk, so it can be stopped and started again on the same port."""

    def __init__(self, data_dir: Path):
        self.port, self.data_dir, self.server = free_port(), data_dir, None

    @property
    def options(self) -> dict:
        return {"endpoint_url": f"http://127.0.0.1:{self.port}", "token": "anon", "project": "test"}

    def start(self) -> None:
        from gcp_storage_emulator.server import create_server

        self.server = create_server("127.0.0.1", self.port, in_memory=False, default_bucket="photos",
                                    data_dir=str(self.data_dir))
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def emulator(tmp_path):
    server = RestartableEmulator(tmp_path / "gcs-data")
    server.start()
    yield server
    server.stop()


def decodes(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return True


@pytest.mark.usefixtures("prefect_harness")
def test_the_gcs_emulator_stopped_and_restarted_mid_run(emulator, tmp_path):
    import gcsfs

    fs = gcsfs.GCSFileSystem(**emulator.options)
    count = 160
    for index in range(count):
        fs.pipe_file(f"photos/in/p{index % 8}/{index:04}.jpg",
                     hostile_corpus.encoded(hostile_corpus.photo((64, 48), seed=index), "JPEG"))
    torch.manual_seed(0)
    store = Location(str(tmp_path / "store"))
    save_model_to(store.child("models/tiny"), UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "tiny"})

    def run():
        return stylize_bucket("gs://photos/in", "gs://photos/out", ["tiny"], model_store=store.url,
                              storage_options=emulator.options, shard_size=20, retries=4, retry_delay_seconds=1,
                              return_state=True)

    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(state=run()))
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and runner.is_alive():
        if fs.glob("photos/out/_manifest_parts/*.parquet"):
            break
        fs.invalidate_cache()
        time.sleep(0.05)
    before = {path: fs.cat_file(path) for path in fs.find("photos/out") if path.endswith(".jpg")}
    emulator.stop()
    time.sleep(2.0)
    emulator.start()
    runner.join(timeout=300)
    assert not runner.is_alive()

    state = outcome["state"]
    if not state.is_completed():  # a clear summary, then the rerun heals it
        assert "run the flow again" in state.message
        state = run()
    assert state.is_completed(), state.message
    fs.invalidate_cache()
    rows = manifest.read_table(Location("gs://photos/out/manifest.parquet", emulator.options)).to_pylist()
    assert sorted(row["input_uri"] for row in rows) == sorted(f"gs://{p}" for p in fs.find("photos/in"))
    assert {row["status"] for row in rows} <= {"ok", "skipped"}
    for row in rows:
        assert decodes(fs.cat_file(row["output_uri"]))
    for path in before:  # written before the outage: still there and valid
        assert decodes(fs.cat_file(path))
    print(f"{len(before)} outputs before the outage; final {manifest.counts(manifest.to_table(rows))}")


def test_a_destination_that_becomes_read_only_fails_clearly_and_heals_on_rerun(tmp_path, capsys):
    source, destination, home = tmp_path / "in", tmp_path / "out", tmp_path / "home"
    hostile_corpus.write_photos(source, 240, groups=3)
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", UNet(UNetConfig()).eval(), {"name": "untrained"})
    command = ["run", str(source), str(destination), "--model", str(model), "--home", str(home), "--quiet",
               "--device", "cpu", "--shard-size", "80", "--batch-size", "4", "--journal-seconds", "0.2"]

    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(code=main(command)))
    runner.start()
    while runner.is_alive() and len(journaled_rows(destination)) < 40:
        time.sleep(0.02)
    read_only = hostile_corpus.make_read_only(destination)
    try:
        runner.join(timeout=300)
        if not read_only:
            pytest.skip("this system cannot make a folder read-only for this user (no chattr)")
        assert outcome["code"] == 1
        err = capsys.readouterr().err
        assert "storage failed" in err and "run the same command again" in err and "Traceback" not in err
        assert ".partial" not in err  # it names the output, not the temporary file that is gone
        written_before = [path for path in destination.rglob("*.jpg")]
        assert written_before and all(decodes(path.read_bytes()) for path in written_before)
    finally:
        hostile_corpus.make_writable(destination)

    done_before = {row["input_uri"] for row in journaled_rows(destination) if row["status"] == "ok"}
    assert main(command) == 0
    rows = pq.read_table(destination / "manifest.parquet").to_pylist()
    assert sorted(row["input_uri"] for row in rows) == sorted(str(path) for path in source.rglob("*.jpg"))
    assert {row["input_uri"] for row in rows if row["status"] == "skipped"} == done_before
    assert all(decodes(Path(row["output_uri"]).read_bytes()) for row in rows)
    assert not [path for path in destination.rglob("*") if path.name.endswith(".partial")]
