"""Credentials given in storage options or inside URLs never appear in logs, manifests, artifacts or Prefect's
records of a run, whether the run succeeds or fails."""

import json
import logging
import uuid

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogWorker

import hostile_corpus
from stylecore.checkpoint import save_model
from stylecore.model import UNet, UNetConfig
from flows.stylize_bucket import stylize_bucket
from stylize.cli import main
from tasks.secrets import StorageSecrets, hide_options, redact, reveal_options
from tasks.storage import Location


def test_redact_masks_url_credentials_sensitive_query_parameters_and_option_values():
    assert redact("https://alice:hunter22@host/x.jpg") == "https://***@host/x.jpg"
    assert redact("gs://b/x.jpg?X-Goog-Signature=abc123&generation=5") == "gs://b/x.jpg?X-Goog-Signature=***&generation=5"
    options = {"token": {"refresh_token": "r-123456", "client_id": "public-id"}, "project": "p",
               "endpoint_url": "http://u:pw-98765@127.0.0.1:9000"}
    text = "failed with r-123456 at http://u:pw-98765@127.0.0.1:9000/b/o"
    assert "r-123456" not in redact(text, options) and "pw-98765" not in redact(text, options)
    assert "public-id" not in redact("client public-id", options)  # anything under a credential key counts
    assert redact("gs://plain/key.jpg", options) == "gs://plain/key.jpg"
    # a web URL's parameters wherever they are; elsewhere "&" and ";" without a "?" are parts of names
    assert redact("https://cdn.example.com/p;jsessionid=0AB12CD/a.jpg") == "https://cdn.example.com/p;jsessionid=***"
    assert redact("https://host/list?prefix=my photos&sig=SECRET") == "https://host/list?prefix=my photos&sig=***"
    assert redact("gs://b/in/cam;key=front.jpg") == "gs://b/in/cam;key=front.jpg"
    assert redact("/data/shot&session=1.jpg") == "/data/shot&session=1.jpg"
    # a local file's name is not a URL: "?sig=" in it is part of the name, which the manifest must keep
    assert Location("/data/x?sig=1.jpg").display == "/data/x?sig=1.jpg"
    assert Location("file:///data/x?token=2.jpg").display == "file:///data/x?token=2.jpg"
    assert Location("https://host/x.jpg?sig=1").display == "https://host/x.jpg?sig=***"
    assert Location("gs://b/x.jpg?X-Goog-Signature=abc").display == "gs://b/x.jpg?X-Goog-Signature=***"


def test_hidden_options_serialise_as_stars_and_still_reach_the_storage():
    hidden = hide_options({"token": "t-000111", "project": "p"})
    assert isinstance(hidden, StorageSecrets) and "t-000111" not in str(hidden) and "t-000111" not in repr(hidden)
    assert reveal_options(hidden) == {"token": "t-000111", "project": "p"}
    assert "t-000111" not in repr(Location("gs://b", {"token": "t-000111"}).child("x"))


@pytest.mark.usefixtures("prefect_harness")
def test_credentials_stay_out_of_logs_manifests_artifacts_and_flow_run_records(gcs_emulator, tmp_path, capfd, caplog):
    import gcsfs

    password, token = f"pw-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    prefix = f"photos/secrets-{uuid.uuid4().hex[:8]}"
    fs = gcsfs.GCSFileSystem(**gcs_emulator)
    for index in range(4):
        fs.pipe_file(f"{prefix}/in/{index}.jpg", hostile_corpus.encoded(hostile_corpus.photo(seed=index), "JPEG"))
    fs.pipe_file(f"{prefix}/in/broken.jpg", b"not an image")
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "tiny"})
    endpoint = gcs_emulator["endpoint_url"].replace("http://", f"http://reader:{password}@")
    options = ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", "token=anon",
               "--storage-option", "project=test", "--storage-option", f"session_token={token}"]
    caplog.set_level(logging.INFO)

    ok = main(["run", f"gs://{prefix}/in", f"gs://{prefix}/out", "--model", str(model), "--home", str(tmp_path),
               "--quiet", "--retries", "0", *options])
    missing_bucket = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/out2"
    refused = [main(["run", f"gs://{prefix}/missing", f"gs://{prefix}/out3", "--model", str(model),
                     "--home", str(tmp_path), "--quiet", *options]),
               main(["run", f"gs://{prefix}/in", missing_bucket, "--model", str(model), "--home", str(tmp_path),
                     "--quiet", *options])]
    assert (ok, refused) == (0, [2, 2])
    failed = stylize_bucket(f"gs://{prefix}/in", missing_bucket, [str(model)], return_state=True,
                            storage_options=hide_options({**gcs_emulator, "endpoint_url": endpoint,
                                                          "session_token": token}))
    assert failed.is_failed() and "does not exist" in failed.message

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        records = [item.model_dump_json() for read in (client.read_flow_runs, client.read_task_runs,
                                                        client.read_logs, client.read_artifacts) for item in read()]
    written = [fs.cat_file(path) for path in fs.find(f"{prefix}/out") + fs.find(f"{prefix}/out2")]
    captured = capfd.readouterr()
    places = {"stdout": captured.out, "stderr": captured.err, "log records": caplog.text,
              "prefect records": "\n".join(records), "written files": b"\n".join(written).decode(errors="replace")}
    assert any("broken.jpg" in text for text in places.values())  # the runs were really recorded
    assert any('"storage_options":"**********"' in record for record in records)  # stored, as stars
    for place, text in places.items():
        assert password not in text and token not in text, f"a credential leaked into the {place}"
    assert json.loads(fs.cat_file(f"{prefix}/out/_manifest_parts/run.json"))["source"] == f"gs://{prefix}/in"


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_given_a_secret_block_records_only_its_name_and_a_retry_of_it_reads_the_block_again(
        gcs_emulator, tmp_path):
    import gcsfs
    from prefect.blocks.system import Secret

    from flows.stylize_bucket import stylize_bucket

    token = f"tok-{uuid.uuid4().hex}"
    block = f"storage-{uuid.uuid4().hex[:8]}"
    Secret(value={**gcs_emulator, "session_token": token}).save(block)
    prefix = f"photos/block-{uuid.uuid4().hex[:8]}"
    fs = gcsfs.GCSFileSystem(**gcs_emulator)
    for index in range(3):
        fs.pipe_file(f"{prefix}/in/{index}.jpg", hostile_corpus.encoded(hostile_corpus.photo(seed=index), "JPEG"))
    torch.manual_seed(0)
    model = save_model(tmp_path / "model", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "tiny"})

    state = stylize_bucket(f"gs://{prefix}/in", f"gs://{prefix}/out", [str(model)], storage_secret_block=block,
                           return_state=True)
    assert state.is_completed() and state.result()["counts"]["ok"] == 3
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert recorded["storage_secret_block"] == block and token not in json.dumps(recorded)
    fs.rm(f"{prefix}/out/1.jpg")
    again = stylize_bucket(**recorded)  # what a retry of that flow run is given
    assert again["counts"] == {"ok": 1, "skipped": 2, "error": 0}


@pytest.mark.usefixtures("prefect_harness")
def test_a_retry_that_has_only_masked_options_fails_at_once_saying_what_to_do(tmp_path):
    from flows.stylize_bucket import stylize_bucket

    with pytest.raises(ValueError, match="recorded masked"):
        stylize_bucket(str(tmp_path / "in"), str(tmp_path / "out"), ["tiny"], storage_options="**********")


def test_a_missing_model_named_by_a_signed_url_is_reported_without_the_signature():
    from stylecore.checkpoint import CheckpointError
    from tasks.models import load_model_from

    with pytest.raises(CheckpointError) as raised:
        load_model_from(Location(f"memory://models-{uuid.uuid4().hex[:8]}/x?X-Goog-Signature=SIG-0123456789"))
    assert "no model at" in str(raised.value) and "SIG-0123456789" not in str(raised.value)


def test_task_errors_reach_prefect_with_the_credentials_masked_and_our_own_errors_unchanged():
    from tasks.storage import StorageError, masking_errors

    from stylecore.train import TrainingDiverged
    from stylecore.vgg import VGGWeightsError

    @masking_errors
    def write_task(url: str, storage_options=None):
        if url.startswith("bad"):
            raise ValueError("a value of ours")
        if url.startswith("vgg"):  # not storage failures: no retry mends them, the CLI says so with its own words
            raise VGGWeightsError("VGG weights file not found: x.pth")
        if url.startswith("nan"):
            raise TrainingDiverged("training diverged")
        raise OSError(f"upload to http://reader:pw-4711xyz@storage.local/{url} failed")

    options = hide_options({"endpoint_url": "http://reader:pw-4711xyz@storage.local"})
    with pytest.raises(StorageError) as raised:
        write_task("b/o", storage_options=options)
    assert "pw-4711xyz" not in str(raised.value) and "write failed: OSError: upload to" in str(raised.value)
    with pytest.raises(ValueError, match="a value of ours"):
        write_task("bad", options)
    with pytest.raises(VGGWeightsError, match="not found"):
        write_task("vgg", options)
    with pytest.raises(TrainingDiverged):
        write_task("nan", options)
