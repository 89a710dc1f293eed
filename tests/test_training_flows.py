"""Training flows against a GCS emulator and a Prefect test server: cached priming (also across processes),
per-style training into a model store, and the whole pipeline in one run."""

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image
from prefect import flow
from prefect.settings import PREFECT_API_URL

from flows.style_pipeline import style_pipeline
from flows.train_style import prime_photos, train_style
from stylecore.model import UNet, UNetConfig
from tasks.models import read_model_metadata, save_model_to
from tasks.storage import Location, MissingBucket, write_bytes
from tasks.training_tasks import primed_checkpoint

pytestmark = pytest.mark.usefixtures("prefect_harness")
REPO = Path(__file__).resolve().parent.parent
TINY = {"steps": 2, "prime_steps": 2, "image_size": 32}
PRIME_ARGS = {"model_config": {"base_channels": 4, "depth": 2, "norm": "instance", "max_channels": 256},
              "train_config": {"image_size": 32, "batch_size": 2, "steps": 2, "epochs": None, "learning_rate": 1e-3,
                               "final_learning_rate_fraction": 0.1, "seed": 0, "log_every": 1, "checkpoint_every": 100}}


@pytest.fixture
def bucket(gcs_emulator, bundled_photos, style_image):
    """A fresh prefix in the emulated bucket with small photos, a style image and a model store."""
    root = Location(f"gs://photos/{uuid.uuid4().hex[:8]}", gcs_emulator)
    fs, path = root.filesystem()
    for source in bundled_photos:
        image = Image.open(source).convert("RGB")
        image.thumbnail((48, 48))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG")
        fs.pipe_file(f"{path}/train/{source.name}", buffer.getvalue())
    fs.pipe_file(f"{path}/styles/swirls.jpg", style_image.read_bytes())
    return root


def prime_state(arguments: dict) -> str:
    @flow
    def prime_once() -> str:
        return primed_checkpoint(**arguments, return_state=True).name

    return prime_once()


def test_priming_is_cached_across_processes_and_invalidated_by_any_input_change(bucket, gcs_emulator):
    arguments = {"photos": bucket.child("train").url, "model_store": bucket.child("store").url,
                 "storage_options": gcs_emulator, **PRIME_ARGS}
    assert prime_state(arguments) == "Completed"
    assert prime_state(arguments) == "Cached"

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "prime_in_new_process.py"), json.dumps(arguments)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert "STATE Cached" in result.stdout, result.stderr[-2000:]

    # A cached result whose checkpoint was deleted from the store is not trusted: priming runs again.
    fs, primed = bucket.child("store/primed").filesystem()
    fs.rm(primed, recursive=True)
    assert prime_state(arguments) == "Completed"
    assert prime_state(arguments) == "Cached"
    # Nor one whose weights were damaged: priming runs again, and its checkpoint is whole once more.
    [weights] = fs.glob(f"{primed}/*/model.safetensors")
    fs.pipe_file(weights, fs.cat_file(weights)[:-8] + b"damaged!")
    assert prime_state(arguments) == "Completed"
    assert prime_state(arguments) == "Cached"

    changed_config = json.loads(json.dumps(arguments))
    changed_config["train_config"]["learning_rate"] = 2e-3
    assert prime_state(changed_config) == "Completed"

    fs, path = bucket.child("train").filesystem()
    fs.pipe_file(f"{path}/extra.jpg", (REPO / "stylecore/assets/photos/rocket.jpg").read_bytes())
    assert prime_state(arguments) == "Completed"


def test_train_style_refuses_a_name_that_has_a_model_unless_asked_to_replace_it(bucket, gcs_emulator, tmp_path):
    store = Location(str(tmp_path / "store"))
    save_model_to(store.child("models/swirls"), UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "swirls"})
    with pytest.raises(ValueError, match="model 'swirls' already exists"):  # before any priming
        train_style([bucket.child("styles/swirls.jpg").url], bucket.child("train").url, store.url,
                    storage_options=gcs_emulator, **TINY)
    with pytest.raises(ValueError, match="invalid model name"):
        train_style([bucket.child("styles/swirls.jpg").url], bucket.child("train").url, store.url,
                    names=["../escape"], storage_options=gcs_emulator, **TINY)


def test_of_two_trainings_of_one_new_name_at_once_one_saves_and_the_other_fails_saying_why(bucket, gcs_emulator,
                                                                                            vgg_weights, monkeypatch):
    # Both pass the flow's check at their start (two users, or a double-clicked Submit): the second to finish used
    # to replace the first's model without a word.
    from concurrent.futures import ThreadPoolExecutor

    from tasks.models import load_model_from

    monkeypatch.setenv("STYLIZE_VGG_WEIGHTS", str(vgg_weights))
    store = bucket.child("store")

    def train() -> str | Exception:
        try:
            return train_style([bucket.child("styles/swirls.jpg").url], bucket.child("train").url, store.url,
                               names=["twice"], storage_options=gcs_emulator, **{**TINY, "steps": 30})[0]
        except ValueError as error:
            return error

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: train(), range(2)))
    saved = [outcome for outcome in outcomes if isinstance(outcome, str)]
    [refused] = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert saved == [store.child("models/twice").url]
    assert "model 'twice'" in str(refused) and "choose another name" in str(refused)
    load_model_from(Location(saved[0], gcs_emulator))  # whole: its weights match its metadata


@pytest.mark.parametrize("bad", [{"style_weight": float("nan")}, {"content_weight": -1.0}, {"tv_weight": float("inf")}])
def test_loss_weights_that_are_not_finite_and_positive_are_refused_before_any_priming(bucket, gcs_emulator, tmp_path,
                                                                                       bad):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match=next(iter(bad))):
        train_style([bucket.child("styles/swirls.jpg").url], bucket.child("train").url, str(tmp_path / "store"),
                    storage_options=gcs_emulator, **TINY, **bad)
    assert not (tmp_path / "store").exists()


def test_a_style_image_vgg_would_shrink_to_nothing_is_refused_before_any_priming(bucket, gcs_emulator, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (600, 8), "orange").save(buffer, "PNG")
    write_bytes(bucket.child("styles/thin.png"), buffer.getvalue())
    with pytest.raises(ValueError, match="short side is 3 px"):
        train_style([bucket.child("styles/thin.png").url], bucket.child("train").url, str(tmp_path / "store"),
                    storage_options=gcs_emulator, **TINY)
    assert not (tmp_path / "store").exists()


def test_the_pipeline_checks_its_bucket_parameters_before_training_and_keeps_existing_models(bucket, gcs_emulator,
                                                                                           tmp_path):
    from prefect.exceptions import ParameterTypeError

    arguments = ([bucket.child("styles/swirls.jpg").url], bucket.child("train").url, str(tmp_path / "store"))
    with pytest.raises(ParameterTypeError, match="output_format"):
        style_pipeline(*arguments, source=bucket.child("train").url, destination=str(tmp_path / "out"),
                       storage_options=gcs_emulator, output_format="gif", **TINY)
    assert not (tmp_path / "store").exists()  # nothing was trained
    save_model_to(Location(str(tmp_path / "store" / "models" / "swirls")), UNet(UNetConfig(base_channels=4, depth=2)),
                  {"name": "swirls"})  # as a run that failed after training leaves it
    with pytest.raises(ValueError, match="already exists"):
        style_pipeline(*arguments, source=bucket.child("train").url, destination=str(tmp_path / "out"),
                       storage_options=gcs_emulator, **TINY)
    missing = f"gs://no-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(MissingBucket, match="the destination .* lies in bucket"):
        style_pipeline(*arguments, source=bucket.child("train").url, destination=f"{missing}/out",
                       storage_options=gcs_emulator, replace=True, **TINY)
    with pytest.raises(MissingBucket, match="the model store .* lies in bucket"):
        style_pipeline(*arguments[:2], f"{missing}/store", source=bucket.child("train").url,
                       destination=str(tmp_path / "out"), storage_options=gcs_emulator, **TINY)
    with pytest.raises(MissingBucket, match="the model store .* lies in bucket"):
        prime_photos(arguments[1], f"{missing}/store", storage_options=gcs_emulator, steps=2, image_size=32)
    assert not (tmp_path / "store" / "primed").exists()  # refused before any priming


def test_the_priming_cache_key_holds_no_credentials_of_the_model_store(photo_dir):
    from tasks.training_tasks import priming_cache_key

    key = priming_cache_key(None, {"photos": str(photo_dir), "model_store": "https://alice:SECRET@host/store",
                                   **PRIME_ARGS})
    other = priming_cache_key(None, {"photos": str(photo_dir), "model_store": "https://host/other", **PRIME_ARGS})
    assert "SECRET" not in key and "alice" not in key and key != other


def test_train_style_writes_one_model_per_style_into_the_store(bucket, gcs_emulator, vgg_weights, monkeypatch):
    fs, path = bucket.filesystem()
    fs.pipe_file(f"{path}/styles/second.jpg", fs.cat_file(f"{path}/styles/swirls.jpg"))
    monkeypatch.setenv("STYLIZE_VGG_WEIGHTS", str(vgg_weights))  # the weights a worker is given, as for the CLI
    models = train_style([bucket.child("styles/swirls.jpg").url, bucket.child("styles/second.jpg").url],
                         bucket.child("train").url, bucket.child("store").url, storage_options=gcs_emulator, **TINY)
    assert models == [bucket.child("store/models/swirls").url, bucket.child("store/models/second").url]
    for url in models:
        metadata = read_model_metadata(Location(url, gcs_emulator))
        assert metadata["kind"] == "style-model" and metadata["steps"] == 2
        assert metadata["vgg"]["origin"] == f"file:{vgg_weights.resolve()}"
        assert metadata["primed_from"]["uri"].startswith(bucket.child("store/primed/").url)
        assert fs.exists(Location(url + "/style.jpg", gcs_emulator).filesystem()[1])


def test_the_whole_pipeline_runs_in_one_flow(bucket, gcs_emulator, vgg_weights):
    summary = style_pipeline([bucket.child("styles/swirls.jpg").url], bucket.child("train").url,
                             bucket.child("store").url, source=bucket.child("train").url,
                             destination=bucket.child("out").url, vgg_weights=str(vgg_weights),
                             storage_options=gcs_emulator, shard_size=2, **TINY)
    assert summary["counts"] == {"ok": 5, "skipped": 0, "error": 0}
    assert summary["shards"] == 3
    fs, path = bucket.child("out").filesystem()
    assert fs.exists(f"{path}/manifest.parquet")


def test_a_gpu_slot_left_taken_by_a_killed_run_does_not_stop_training_on_the_temporary_server(photo_dir, style_image,
                                                                                            vgg_weights, tmp_path):
    # kill -9 leaves the slot counted in PREFECT_HOME's database, and the temporary server (no PREFECT_API_URL)
    # never reclaims it: the next training must not wait for it
    script = f"""
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from flows.train_style import prime_photos, train_style
from tasks.training_tasks import GPU_LIMIT, ensure_gpu_limit

@flow
def leak():
    ensure_gpu_limit()
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=1))

leak()
print(train_style([{str(style_image)!r}], {str(photo_dir)!r}, {str(tmp_path / "store")!r}, names=["after"],
                  steps=1, prime_steps=1, image_size=32))
"""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(Path(__file__).parent.parent),
               STYLIZE_VGG_WEIGHTS=str(vgg_weights))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "store" / "models" / "after" / "model.json").is_file()
