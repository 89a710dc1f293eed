"""The stylize-bucket flow on a real (temporary) Prefect server: outputs, manifest, retries, failed shards, rerun."""

import collections
import io
import multiprocessing
import os
import signal
import threading
import time
import uuid

import duckdb
import pandas
import fsspec
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.exceptions import ParameterTypeError
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from flows.retry_failed import retry_failed
from flows.stylize_bucket import ShardsFailed, stylize_bucket
from stylecore.model import UNet, UNetConfig
from tasks import manifest
from tasks.models import save_model_to
from tasks.storage import Location

pytestmark = pytest.mark.usefixtures("prefect_harness")


def jpeg(color, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def model_store(tmp_path) -> str:
    torch.manual_seed(0)
    store = Location(str(tmp_path / "store"))
    save_model_to(store.child("models/tiny"), UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "tiny"})
    return store.url


def make_bucket(root, count: int, broken: int = 0) -> None:
    fs, path = Location(str(root)).filesystem()
    for index in range(count):
        fs.makedirs(f"{path}/part{index % 3}", exist_ok=True)
        fs.pipe_file(f"{path}/part{index % 3}/img{index:03}.jpg", jpeg((index * 20 % 255, 80, 160)))
    for index in range(broken):
        fs.pipe_file(f"{path}/broken{index}.jpg", b"definitely not a jpeg")


def test_a_bucket_is_stylised_with_a_typed_manifest_readable_by_pyarrow_and_duckdb(tmp_path, model_store):
    make_bucket(tmp_path / "in", 7, broken=2)
    destination = tmp_path / "out"
    summary = stylize_bucket(str(tmp_path / "in"), str(destination), ["tiny"], model_store=model_store, shard_size=3)
    assert summary["images"] == 9 and summary["shards"] == 3 and summary["failed_shards"] == 0
    assert summary["counts"] == {"ok": 7, "skipped": 0, "error": 2}

    table = pq.read_table(destination / "manifest.parquet")
    assert table.schema.equals(manifest.SCHEMA, check_metadata=False)
    assert table.num_rows == 9 and len(set(table.column("input_uri").to_pylist())) == 9
    assert len(set(table.column("flow_run_id").to_pylist())) == 1
    errors = duckdb.sql(f"select count(*), min(error) from '{destination / 'manifest.parquet'}' where status = 'error'").fetchone()
    assert errors[0] == 2 and "not a recognised image format" in errors[1]
    frame = pandas.read_parquet(destination / "manifest.parquet")
    assert str(frame["width"].dtype) == "Int32" or str(frame["width"].dtype).startswith(("int", "float"))
    assert str(frame["finished_at"].dtype).startswith("datetime64") and len(frame) == 9
    ok = duckdb.sql(f"select output_uri from '{destination / 'manifest.parquet'}' where status = 'ok'").fetchall()
    for (uri,) in ok:
        assert Image.open(uri).size == (24, 16)

    again = stylize_bucket(str(tmp_path / "in"), str(destination), ["tiny"], model_store=model_store, shard_size=3)
    assert again["counts"] == {"ok": 0, "skipped": 7, "error": 2}


def test_skip_existing_leaves_outputs_made_elsewhere_alone(tmp_path, model_store):
    make_bucket(tmp_path / "in", 3)
    made_elsewhere = tmp_path / "out" / "part0" / "img000.jpg"
    made_elsewhere.parent.mkdir(parents=True)
    made_elsewhere.write_bytes(b"made elsewhere")
    summary = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"], model_store=model_store,
                             skip_existing=True)
    assert summary["counts"] == {"ok": 2, "skipped": 1, "error": 0}
    assert made_elsewhere.read_bytes() == b"made elsewhere"


def test_model_names_without_a_store_come_from_the_workers_stylize_home(tmp_path, model_store, monkeypatch):
    monkeypatch.setenv("STYLIZE_HOME", str(tmp_path / "store"))  # where train-new-style puts models by default
    make_bucket(tmp_path / "in", 2)
    summary = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"])
    assert summary["counts"] == {"ok": 2, "skipped": 0, "error": 0}


@pytest.mark.parametrize("bad,named", [({"quality": 500}, "quality"), ({"output_format": "gif"}, "output_format"),
                                       ({"shard_size": 0}, "shard_size"), ({"workers": -3}, "workers"),
                                       ({"models": []}, "models")])
def test_bad_parameters_fail_the_run_at_once_naming_the_parameter(tmp_path, model_store, bad, named):
    make_bucket(tmp_path / "in", 3)
    parameters = {"source": str(tmp_path / "in"), "destination": str(tmp_path / "out"), "models": ["tiny"],
                  "model_store": model_store, "retry_delay_seconds": 60.0, **bad}
    started = time.perf_counter()
    with pytest.raises(ParameterTypeError, match=named):
        stylize_bucket(**parameters)
    assert time.perf_counter() - started < 30  # not after a minute's retry of every shard
    assert not (tmp_path / "out").exists()


def test_shards_can_run_in_worker_processes_as_tasks_of_the_same_flow_run(tmp_path, model_store):
    make_bucket(tmp_path / "in", 7, broken=2)
    state = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"], model_store=model_store,
                           shard_size=3, workers=2, return_state=True)
    summary, flow_run_id = state.result(), state.state_details.flow_run_id
    assert summary["workers"] == 2 and summary["failed_shards"] == 0
    assert summary["counts"] == {"ok": 7, "skipped": 0, "error": 2}
    table = pq.read_table(tmp_path / "out" / "manifest.parquet")
    assert table.num_rows == 9 and set(table.column("flow_run_id").to_pylist()) == {str(flow_run_id)}
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    shard_runs = [run for run in task_runs if run.name.startswith("stylize-shard-")]
    assert len(shard_runs) == 3 and all(run.state.is_completed() for run in shard_runs)


def test_a_shard_whose_worker_process_is_killed_is_retried_and_the_run_completes(tmp_path, model_store):
    make_bucket(tmp_path / "in", 30)
    killed: list[int] = []

    def kill_a_worker_once_outputs_appear() -> None:  # as the kernel's out-of-memory killer would
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any((tmp_path / "out").glob("part*/*.jpg")):
            time.sleep(0.005)
        workers = multiprocessing.active_children()
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)

    killer = threading.Thread(target=kill_a_worker_once_outputs_appear)
    killer.start()
    state = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"], model_store=model_store,
                           shard_size=1, workers=2, retry_delay_seconds=0, return_state=True)
    killer.join()
    assert killed and state.is_completed()
    summary, flow_run_id = state.result(), state.state_details.flow_run_id
    assert summary["counts"]["ok"] + summary["counts"]["skipped"] == 30 and summary["failed_shards"] == 0
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    retried = [run for run in task_runs if run.name.startswith("stylize-shard-") and run.run_count > 1]
    assert retried, "no shard was running or queued when its worker was killed"


def test_a_run_leaves_progress_table_and_summary_artifacts(tmp_path, model_store):
    make_bucket(tmp_path / "in", 4)
    state = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"], model_store=model_store,
                           shard_size=2, return_state=True)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_type = {artifact.type: artifact for artifact in artifacts}
    assert {"progress", "table", "markdown"} <= set(by_type)
    assert float(by_type["progress"].data) == 100.0
    assert "ok 4, skipped 0, error 0" in by_type["markdown"].data


class FlakyStore(MemoryFileSystem):
    """A real in-memory filesystem whose writes fail: once for each image output whose path contains one of
    ``fail_once``, and always for a path that contains ``broken_marker``. ``written`` counts successful writes."""

    protocol = "flaky"
    fail_once: set[str] = set()
    broken_marker: str | None = None
    written: collections.Counter = collections.Counter()
    lock = threading.Lock()  # shards write from several threads at once

    def pipe_file(self, path, value, **kwargs):
        if FlakyStore.broken_marker and FlakyStore.broken_marker in path:
            raise OSError(f"simulated outage writing {path}")
        with FlakyStore.lock:
            failing = {name for name in FlakyStore.fail_once if name in path and "/out/part" in path}
            FlakyStore.fail_once -= failing
        if failing:
            raise OSError("simulated transient write failure")
        result = super().pipe_file(path, value, **kwargs)
        with FlakyStore.lock:
            FlakyStore.written[path] += 1
        return result


@pytest.fixture
def flaky_destination():
    fsspec.register_implementation("flaky", FlakyStore, clobber=True)
    FlakyStore.fail_once, FlakyStore.broken_marker, FlakyStore.written = set(), None, collections.Counter()
    yield f"flaky://{uuid.uuid4().hex[:8]}/out"
    FlakyStore.fail_once, FlakyStore.broken_marker = set(), None


def test_transient_write_failures_are_retried_and_the_run_completes_writing_each_output_once(
        tmp_path, model_store, flaky_destination):
    make_bucket(tmp_path / "in", 6)  # shards: part0/img000, part0/img003, part1/img001 | part1/img004, part2/...
    FlakyStore.fail_once = {"img001", "img005"}  # each shard's last output: the others are written before it fails
    summary = stylize_bucket(str(tmp_path / "in"), flaky_destination, ["tiny"], model_store=model_store,
                             shard_size=3, retries=3, retry_delay_seconds=0)
    # Outputs an earlier attempt of this same run wrote are this run's work: ok, not "skipped as already done".
    assert summary["counts"] == {"ok": 6, "skipped": 0, "error": 0} and summary["failed_shards"] == 0
    assert not FlakyStore.fail_once
    outputs = {path: count for path, count in FlakyStore.written.items() if "/out/part" in path}
    assert len(outputs) == 6 and set(outputs.values()) == {1}  # none written twice
    table = manifest.read_table(Location(flaky_destination + "/manifest.parquet"))
    assert sorted(table.column("status").to_pylist()) == ["ok"] * 6


def test_shards_failing_after_retries_fail_the_run_and_a_rerun_redoes_only_them(tmp_path, model_store,
                                                                                flaky_destination):
    make_bucket(tmp_path / "in", 9)  # shards: part0/*, part1/*, part2/* (3 images each)
    FlakyStore.broken_marker = "/out/part1/"
    with pytest.raises(ShardsFailed, match="1 of 3 shards failed"):
        stylize_bucket(str(tmp_path / "in"), flaky_destination, ["tiny"], model_store=model_store, shard_size=3,
                       retries=1, retry_delay_seconds=0)
    first = manifest.read_table(Location(flaky_destination + "/manifest.parquet"))
    assert manifest.counts(first) == {"ok": 6, "skipped": 0, "error": 0}  # the other shards' rows are intact

    FlakyStore.broken_marker = None
    summary = stylize_bucket(str(tmp_path / "in"), flaky_destination, ["tiny"], model_store=model_store, shard_size=3)
    assert summary["counts"] == {"ok": 3, "skipped": 6, "error": 0}
    assert summary["rows"] == 9


@pytest.mark.parametrize("by", ["destination", "flow_run_id"])
def test_retry_failed_redoes_only_the_failed_shards(by, tmp_path, model_store, flaky_destination):
    make_bucket(tmp_path / "in", 9)
    FlakyStore.broken_marker = "/out/part2/"
    state = stylize_bucket(str(tmp_path / "in"), flaky_destination, ["tiny"], model_store=model_store, shard_size=3,
                           retries=0, return_state=True)
    assert state.is_failed()
    FlakyStore.broken_marker = None
    if by == "destination":
        summary = retry_failed(destination=flaky_destination)
    else:
        summary = retry_failed(flow_run_id=str(state.state_details.flow_run_id))
    assert summary["counts"] == {"ok": 3, "skipped": 6, "error": 0}
    assert manifest.read_table(Location(flaky_destination + "/manifest.parquet")).num_rows == 9


def test_a_tampered_or_truncated_model_stops_the_run_before_any_shard(tmp_path, model_store):
    make_bucket(tmp_path / "in", 4)
    weights = tmp_path / "store" / "models" / "tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    state = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"], model_store=model_store,
                           return_state=True)
    assert state.is_failed() and "corrupt or was modified" in state.message
    assert not (tmp_path / "out").exists()  # not one shard ran
    weights.write_bytes(bytes(data[: len(data) // 3]))
    state = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"], model_store=model_store,
                           return_state=True)
    assert state.is_failed() and "tiny" in state.message


def test_a_primed_autoencoder_given_as_a_model_is_refused_before_any_shard(tmp_path, model_store):
    make_bucket(tmp_path / "in", 2)
    primed = Location(str(tmp_path / "primed" / "abc"))
    save_model_to(primed, UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"kind": "primed-autoencoder"})
    state = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), [primed.url], return_state=True)
    assert state.is_failed() and "is a primed autoencoder, not a style model" in state.message
    assert not (tmp_path / "out").exists()


def test_two_models_of_one_name_are_refused_before_any_shard(tmp_path, model_store):
    make_bucket(tmp_path / "in", 2)
    other = Location(str(tmp_path / "other-store")).child("models/tiny")
    save_model_to(other, UNet(UNetConfig(base_channels=4, depth=1)).eval(), {"name": "tiny"})
    state = stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny", other.url], model_store=model_store,
                           return_state=True)
    assert state.is_failed() and "are both named 'tiny'" in state.message
    assert not (tmp_path / "out").exists()


def test_shards_failed_keeps_its_reason_and_summary_and_gives_its_advice_once_also_when_pickled():
    import pickle

    failed = pickle.loads(pickle.dumps(ShardsFailed("1 of 3 shards failed (disk full)", {"counts": {"ok": 2}})))
    assert failed.reason == "1 of 3 shards failed (disk full)" and failed.summary == {"counts": {"ok": 2}}
    assert str(failed) == "1 of 3 shards failed (disk full); run the flow again to redo only the missing images"


def test_retry_failed_without_an_earlier_run_says_so(tmp_path):
    with pytest.raises(ValueError, match="has no record of a stylize-bucket run"):
        retry_failed(destination=str(tmp_path / "never-written"))
    (tmp_path / "damaged" / "_manifest_parts").mkdir(parents=True)
    (tmp_path / "damaged" / "_manifest_parts" / "run.json").write_text('{"source": ')
    with pytest.raises(ValueError, match="is not readable JSON"):
        retry_failed(destination=str(tmp_path / "damaged"))
    with pytest.raises(ValueError, match="no flow run 00000000-0000-4000-8000-000000000000 on this Prefect server"):
        retry_failed(flow_run_id="00000000-0000-4000-8000-000000000000")


def test_retry_failed_refuses_an_id_that_is_not_a_stylize_bucket_run():
    from prefect import flow

    @flow(name="something-else")
    def something_else() -> int:
        return 1

    with pytest.raises(ValueError, match="is not a flow run id"):
        retry_failed(flow_run_id="12345")
    state = something_else(return_state=True)
    with pytest.raises(ValueError, match="not of 'stylize-bucket'"):
        retry_failed(flow_run_id=str(state.state_details.flow_run_id))


def test_a_model_replaced_in_the_store_during_a_run_is_refused_rather_than_mixed_in(tmp_path, model_store):
    from stylecore.checkpoint import CheckpointError
    from tasks.stylize_tasks import load_models, open_shard_workers

    checksums: dict = {}
    load_models(["tiny"], model_store, {}, device="cpu", checksums=checksums)
    torch.manual_seed(1)  # another training of the same name, saved while the run goes on
    save_model_to(Location(model_store).child("models/tiny"), UNet(UNetConfig(base_channels=4, depth=2)).eval(),
                  {"name": "tiny"})
    with pytest.raises(CheckpointError, match="was replaced while this run was using it"):
        load_models(["tiny"], model_store, {}, device="cpu", pinned=checksums)
    assert load_models(["tiny"], model_store, {}, device="cpu")  # a new run takes the new version
    # worker processes get (and a worker started again after a crash gets again) the copies loaded for them here
    with pytest.raises(CheckpointError, match="was replaced while this run was using it"):
        open_shard_workers(["tiny"], model_store, 2, pinned=checksums)


def test_a_scheduled_rerun_over_a_bucket_that_gained_and_lost_images_stylises_only_the_new_ones(gcs_emulator,
                                                                                                model_store):
    root = f"gs://photos/grown-{uuid.uuid4().hex[:8]}"
    fs, _ = Location(root, gcs_emulator).filesystem()
    for index in range(9):
        fs.pipe_file(f"{root}/in/img{index:02}.jpg", jpeg((index * 25, 80, 160)))
    run = {"source": f"{root}/in", "destination": f"{root}/out", "models": ["tiny"], "model_store": model_store,
           "storage_options": gcs_emulator, "shard_size": 3}
    assert stylize_bucket(**run)["counts"] == {"ok": 9, "skipped": 0, "error": 0}
    fs.pipe_file(f"{root}/in/aaa-new.jpg", jpeg("red"))  # sorts first: every shard after it moves
    fs.rm(f"{root}/in/img04.jpg")
    assert stylize_bucket(**run)["counts"] == {"ok": 1, "skipped": 8, "error": 0}
    rows = manifest.read_table(Location(f"{root}/out/manifest.parquet", gcs_emulator)).to_pylist()
    assert len(rows) == 9 and all(row["input_version"] for row in rows)
