"""Deployment declarations and the new-style form: titles, defaults and validation; bad values refused before
any training; a tiny training through the form's flow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from deployments.serve import deployments
from flows.new_style import TrainStyleRequest, train_new_style

REPO = Path(__file__).resolve().parent.parent


def test_three_deployments_with_an_inactive_example_schedule_for_bucket_runs():
    declared = {d.name: d for d in deployments()}
    assert set(declared) == {"train-style", "stylize-bucket", "retry-failed"}
    [schedule] = declared["stylize-bucket"].schedules
    assert schedule.active is False and schedule.schedule.cron == "0 2 * * *"
    assert schedule.parameters["source"].startswith("gs://example-bucket/")


def test_the_training_form_has_titles_descriptions_and_defaults():
    schema = parameter_schema(train_new_style).model_dump()  # what the deployment sends to the UI
    fields = schema["definitions"]["TrainStyleRequest"]["properties"]
    for name in ("style_image_url", "model_name", "photos_url", "preset", "style_weight", "content_weight"):
        assert fields[name]["title"] and fields[name]["description"], name
    assert fields["preset"]["enum"] == ["fast", "full"] and fields["preset"]["default"] == "fast"
    assert fields["style_weight"]["exclusiveMinimum"] == 0


@pytest.mark.parametrize("bad,message", [
    ({"model_name": "../evil"}, "model_name"),
    ({"preset": "huge"}, "preset"),
    ({"style_weight": -1}, "style_weight"),
    ({"content_weight": -0.5}, "content_weight"),
    ({"unknown_field": 1}, "unknown_field"),
    # what the command line refuses too: a name taken for a weights file, or ending in a newline; crops under 32 px
    ({"model_name": "starry.safetensors"}, "must not end in .safetensors"),
    ({"model_name": "starry\n"}, "model_name"),
    ({"image_size": 16}, "image_size"),
])
def test_bad_form_values_are_refused(bad, message):
    values = {"style_image_url": "s.jpg", "model_name": "ok", "photos_url": "photos", **bad}
    with pytest.raises(ValidationError, match=message):
        TrainStyleRequest(**values)


@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_refuses_bad_values_and_unreadable_inputs_before_training(tmp_path, photo_dir, style_image):
    store = tmp_path / "store"
    with pytest.raises(ParameterTypeError):
        train_new_style(request={"style_image_url": str(style_image), "model_name": "bad name!",
                                 "photos_url": str(photo_dir), "model_store": str(store)})
    (tmp_path / "fake.jpg").write_text("not an image")
    (tmp_path / "folder.jpg").mkdir()
    for style, photos, message in [
        (tmp_path / "missing.jpg", photo_dir, "style image not found"),
        (tmp_path / "folder.jpg", photo_dir, "is a folder, not an image file"),
        (tmp_path / "fake.jpg", photo_dir, "not a readable image"),
        (style_image, tmp_path / "no-photos-here", "does not exist"),
    ]:
        request = TrainStyleRequest(style_image_url=str(style), model_name="m", photos_url=str(photos),
                                    model_store=str(store))
        with pytest.raises(ValueError, match=message):
            train_new_style(request)
    assert not store.exists()  # nothing was primed or trained


@pytest.mark.usefixtures("prefect_harness")
def test_a_new_style_is_trained_from_the_form(tmp_path, photo_dir, style_image, vgg_weights, monkeypatch):
    monkeypatch.setenv("STYLIZE_VGG_WEIGHTS", str(vgg_weights))
    request = TrainStyleRequest(style_image_url=str(style_image), model_name="from-form", photos_url=str(photo_dir),
                                steps=2, prime_steps=2, image_size=32, model_store=str(tmp_path / "store"))
    url = train_new_style(request)
    assert url == str(tmp_path / "store" / "models" / "from-form")
    assert (tmp_path / "store" / "models" / "from-form" / "model.safetensors").is_file()


@pytest.mark.usefixtures("prefect_harness")
def test_retry_failed_refuses_a_negative_retry_count_before_it_starts(tmp_path):
    from flows.retry_failed import retry_failed

    # the form accepted -1, and the run failed later, inside the stylize-bucket run it started
    with pytest.raises(ParameterTypeError, match="retries"):
        retry_failed(destination=str(tmp_path / "out"), retries=-1)
    fields = parameter_schema(retry_failed).model_dump()["properties"]
    assert fields["retries"]["minimum"] == 0 and fields["retries"]["maximum"] == 100


@pytest.mark.parametrize("api_url,message", [
    (None, "PREFECT_API_URL is not set"),  # it served against a temporary server no UI shows
    ("http://127.0.0.1:9/api", "no Prefect server answers at http://127.0.0.1:9/api"),  # it was a 69-line traceback
])
def test_serving_without_a_reachable_prefect_server_is_one_line(api_url, message, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile naming a server
    if api_url:
        env["PREFECT_API_URL"] = api_url
    done = subprocess.run([sys.executable, "-m", "deployments.serve"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("deployments.serve: error: "), done.stderr
    assert message in lines[0]
