"""The stylize command line, end to end on tiny real inputs, and its answers to user mistakes."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from stylize.cli import main
from tasks.lease import LEASE_NAME
from tasks.storage import Location, write_bytes
from tests.test_lease import lease_of

TINY = ["--steps", "3", "--prime-steps", "3", "--image-size", "32", "--batch-size", "2", "--style-size", "64", "--quiet"]
STYLIZE = Path(sys.executable).parent / "stylize"


@pytest.fixture
def trained(home, photo_dir, style_image, capsys):
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "swirls", *TINY]) == 0
    capsys.readouterr()
    return home / "models" / "swirls"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("stylize: error: ")
    return err[0]


def test_prime_writes_a_checkpoint_and_reuses_the_cache_on_a_second_run(home, photo_dir, tmp_path, capsys):
    out = tmp_path / "primed"
    args = ["prime", str(photo_dir), "--out", str(out), "--steps", "3", "--image-size", "32", "--quiet"]
    assert main(args) == 0
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    assert "training the autoencoder" in capsys.readouterr().err
    assert main(args) == 0
    assert "reusing cached autoencoder" in capsys.readouterr().err
    assert main([*args, "--checkpoint-every", "7"]) == 0  # how often it saves its state changes nothing it learns
    assert "reusing cached autoencoder" in capsys.readouterr().err
    # A damaged cache entry is set aside and the priming done again, not an error on every later run.
    [cached] = (home / "primed").glob("*/model.safetensors")
    cached.write_bytes(cached.read_bytes()[:-8] + b"damaged!")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "the cached autoencoder is damaged" in err and "training the autoencoder" in err
    assert main(args) == 0
    assert "reusing cached autoencoder" in capsys.readouterr().err
    # Any change to the photos invalidates the cache.
    Image.new("RGB", (40, 30), "green").save(photo_dir / "new.png")
    assert main(args) == 0
    assert "training the autoencoder" in capsys.readouterr().err


def test_prime_can_add_a_content_term_which_is_part_of_the_cache_key(home, photo_dir, capsys):
    base = ["prime", str(photo_dir), "--steps", "2", "--image-size", "32", "--quiet"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--content-weight", "0.1"]) == 0
    assert "training the autoencoder" in capsys.readouterr().err
    primed = [json.loads(p.read_text()) for p in (home / "primed").glob("*/model.json")]
    assert sorted(str(m["content_term"] and m["content_term"]["layer"]) for m in primed) == ["None", "relu3_1"]


def test_train_stores_weights_metadata_and_style_image(trained):
    metadata = json.loads((trained / "model.json").read_text())
    assert (trained / "model.safetensors").is_file() and (trained / "style.jpg").is_file()
    assert metadata["name"] == "swirls" and metadata["steps"] == 3
    assert metadata["style_layers"] == ["relu1_1", "relu2_1", "relu2_2", "relu3_1"]
    assert metadata["content_layer"] == "relu3_1"
    assert metadata["vgg"]["arch"] == "vgg19"
    assert len(metadata["style_sha256"]) == 64 and metadata["primed_from"]["weights_sha256"]
    assert {"torch", "torchvision", "stylize"} <= set(metadata["versions"])
    assert metadata["history"][-1]["step"] == 3


def test_train_uses_a_given_primed_checkpoint(home, photo_dir, style_image, tmp_path, capsys):
    primed = tmp_path / "primed"
    assert main(["prime", str(photo_dir), "--out", str(primed), "--steps", "2", "--image-size", "32",
                 "--base-channels", "8", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "p", "--primed", str(primed),
                 *TINY]) == 0
    err = capsys.readouterr().err
    assert "priming" not in err and "--prime-steps is not used" in err  # TINY gives one: said, not silently dropped
    metadata = json.loads((home / "models" / "p" / "model.json").read_text())
    assert metadata["architecture"]["base_channels"] == 8
    # the primed checkpoint itself is no style model: it gives the photos back (it was run as one, exit 0)
    for command in (["run", str(photo_dir), str(tmp_path / "out"), "--model", str(primed)],
                    ["run", str(photo_dir), (tmp_path / "out").as_uri(), "--model", str(primed)]):
        assert main([*command, "--quiet"]) == 2
        assert "is a primed autoencoder, not a style model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_stylises_every_image_with_the_same_relative_paths_and_skips_bad_files(trained, photo_dir, tmp_path, capsys):
    (photo_dir / "sub" / "broken.jpg").write_bytes(b"not really a jpeg")
    out = tmp_path / "out"
    assert main(["run", str(photo_dir), str(out), "--model", "swirls", "--quiet"]) == 0
    captured = capsys.readouterr()
    inputs = sorted(p.relative_to(photo_dir).with_suffix(".jpg") for p in photo_dir.rglob("*.jpg")
                    if p.name != "broken.jpg")
    outputs = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.suffix == ".jpg")
    assert outputs == inputs
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == len(inputs) + 1
    assert [row["error"] for row in rows if row["status"] == "error"] == ["not a recognised image format"]
    for relative in inputs:
        with Image.open(out / relative) as image:
            assert image.size == Image.open(photo_dir / relative).size
    assert "stylize: warning: not stylised: " in captured.err and "broken.jpg: not a recognised" in captured.err
    assert "1 not stylised" in captured.out


def test_run_in_worker_processes_writes_every_output_and_one_manifest(trained, photo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(photo_dir), str(out), "--model", "swirls", "--workers", "2", "--shard-size", "2",
                 "--quiet"]) == 0
    inputs = sorted(p.relative_to(photo_dir).with_suffix(".jpg") for p in photo_dir.rglob("*.jpg"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == inputs
    assert [row["status"] for row in pq.read_table(out / "manifest.parquet").to_pylist()] == ["ok"] * len(inputs)
    printed = capsys.readouterr().out
    assert f"{len(inputs)} written" in printed and "in 2 processes" in printed


def test_run_refuses_a_destination_that_is_the_source_or_holds_it(trained, photo_dir, capsys):
    before = sorted(p for p in photo_dir.rglob("*") if p.is_file())
    assert main(["run", str(photo_dir), str(photo_dir), "--model", "swirls", "--quiet"]) == 2
    assert "is the source itself" in one_error_line(capsys)
    assert main(["run", str(photo_dir / "sub"), str(photo_dir), "--model", "swirls", "--quiet"]) == 2
    assert "lies inside the destination" in one_error_line(capsys)
    assert sorted(p for p in photo_dir.rglob("*") if p.is_file()) == before  # nothing written, nothing removed


def test_run_into_a_destination_holding_a_file_named_manifest_that_is_not_one_is_a_one_line_error(
        trained, photo_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "manifest.parquet").write_text("junk\n")
    assert main(["run", str(photo_dir), str(destination), "--model", "swirls", "--quiet"]) == 2
    assert "manifest.parquet is not a manifest this tool can read" in one_error_line(capsys)
    pq.write_table(pa.table({"input_uri": ["x.jpg"], "status": ["ok"]}), destination / "manifest.parquet")  # another tool's
    assert main(["run", str(photo_dir), str(destination), "--model", "swirls", "--quiet"]) == 2
    assert "not a manifest this tool can read" in one_error_line(capsys)
    assert (destination / "manifest.parquet").read_bytes()[:4] == b"PAR1"  # left as it was


def test_run_leaves_a_destination_another_run_is_writing_to_alone_with_exit_75(trained, photo_dir, tmp_path, capsys):
    destination = tmp_path / "out"
    write_bytes(Location(str(destination)).child(LEASE_NAME), lease_of("nightly-run", "other-host", 4242, 20))
    assert main(["run", str(photo_dir), str(destination), "--model", "swirls", "--quiet"]) == 75
    assert "another run is writing to" in one_error_line(capsys)
    assert [p.name for p in destination.rglob("*") if p.is_file()] == ["lease.json"]


def test_a_model_name_means_the_stores_model_even_beside_a_folder_of_that_name(trained, photo_dir, tmp_path,
                                                                                capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs named after the model, in the current folder: a common first try
    assert main(["run", str(photo_dir), "swirls", "--model", "swirls", "--quiet"]) == 0
    assert main(["run", str(photo_dir), "swirls", "--model", "swirls", "--quiet"]) == 0
    assert "0 written" in capsys.readouterr().out


def test_run_writes_png_and_can_leave_existing_outputs(trained, photo_dir, tmp_path, capsys):
    out = tmp_path / "png"
    assert main(["run", str(photo_dir), str(out), "--model", str(trained), "--format", "png", "--quiet"]) == 0
    assert all(p.suffix == ".png" for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet")
    capsys.readouterr()
    assert main(["run", str(photo_dir), str(out), "--model", "swirls", "--format", "png", "--skip-existing",
                 "--quiet"]) == 0
    assert "0 written" in capsys.readouterr().out  # all already done
    same = tmp_path / "same"  # format names in any case, as with PNG or JPG
    assert main(["run", str(photo_dir), str(same), "--model", "swirls", "--format", "Same", "--quiet"]) == 0
    assert {p.suffix for p in same.rglob("*") if p.is_file() and p.suffix != ".parquet"} <= {".jpg", ".png"}
    # a limit far above any file ("no limit") is no reason to set that much memory aside
    assert main(["run", str(photo_dir), str(tmp_path / "unlimited"), "--model", "swirls", "--max-bytes",
                 str(2**62), "--quiet"]) == 0


def test_run_with_a_small_pixel_budget_tiles_large_images_into_the_same_pictures(trained, bundled_photos, tmp_path):
    photos = tmp_path / "large"
    photos.mkdir()
    Image.open(bundled_photos[0]).convert("RGB").resize((480, 400)).save(photos / "large.png")
    whole, tiled = tmp_path / "whole", tmp_path / "tiled"
    assert main(["run", str(photos), str(whole), "--model", "swirls", "--format", "png", "--quiet"]) == 0
    assert main(["run", str(photos), str(tiled), "--model", "swirls", "--format", "png", "--quiet",
                 "--max-batch-pixels", "70000"]) == 0
    one, other = (Image.open(folder / "large.png") for folder in (whole, tiled))
    difference = [abs(a - b) for a, b in zip(one.tobytes(), other.tobytes())]
    assert one.size == (480, 400) and max(difference) <= 1


def test_eval_reports_model_and_identity_distances_and_writes_a_contact_sheet(trained, photo_dir, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--sheet", str(sheet), "--json",
                 "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)  # one JSON object, the sheet named in it
    assert result["images"] == 5 and result["model_path"] == str(trained) and result["sheet"] == str(sheet)
    assert result["identity"]["content"] == 0.0
    assert result["identity"]["style"] > 0 and result["model"]["style"] > 0
    by_layer = result["model_style_by_layer"]  # equal layer weights: the style distance is their mean
    assert len(by_layer) == 4 and sum(by_layer.values()) / 4 == pytest.approx(result["model"]["style"], rel=1e-5)
    with Image.open(sheet) as image:
        assert image.width > image.height / 5  # rows of input | output
    capsys.readouterr()
    (tmp_path / "a_folder.png").mkdir()
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--sheet", str(tmp_path / "a_folder.png"),
                 "--quiet"]) == 2
    assert "cannot write the contact sheet" in capsys.readouterr().err

    # a sheet too tall for WebP (16,383 px a side) is refused; the sheet already there is left as it was
    many = tmp_path / "many"
    many.mkdir()
    for index in range(64):
        Image.new("RGB", (32, 24), (index * 4, 90, 160)).save(many / f"p{index:02}.jpg")
    (tmp_path / "old.webp").write_bytes(b"an earlier sheet")
    assert main(["eval", "--model", "swirls", "--photos", str(many), "--sheet", str(tmp_path / "old.webp"),
                 "--sheet-rows", "64", "--image-size", "32", "--quiet"]) == 2
    assert "more than WEBP holds" in one_error_line(capsys)
    assert (tmp_path / "old.webp").read_bytes() == b"an earlier sheet"
    assert [path.name for path in tmp_path.iterdir() if "partial" in path.name] == []


def test_eval_with_other_vgg_weights_than_the_model_was_trained_with_warns(trained, photo_dir, capsys):
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--limit", "2", "--quiet"]) == 0
    assert "other VGG weights" not in capsys.readouterr().err
    # a model trained with torchvision's weights (which have no checksum here), evaluated with a weights file
    copy = trained.parent / "with-torchvision"
    shutil.copytree(trained, copy)
    metadata = json.loads((copy / "model.json").read_text())
    metadata["vgg"] = {**metadata["vgg"], "arch": "vgg16", "origin": "torchvision:vgg16", "sha256": None}
    (copy / "model.json").write_text(json.dumps(metadata))
    assert main(["eval", "--model", "with-torchvision", "--photos", str(photo_dir), "--limit", "2", "--quiet"]) == 0
    assert "this model was trained with other VGG weights (torchvision:vgg16, vgg16)" in capsys.readouterr().err


@pytest.mark.parametrize("edit", [{"loss": "x"}, {"loss": {"bogus": 1}}, {"train_config": [1]},
                                  {"train_config": {"image_size": "big"}}])
def test_eval_of_a_model_whose_model_json_cannot_be_read_is_one_line(trained, photo_dir, capsys, edit):
    metadata = json.loads((trained / "model.json").read_text())
    (trained / "model.json").write_text(json.dumps({**metadata, **edit}))  # by hand, or by another version
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--limit", "2", "--quiet"]) == 2
    assert "has a model.json this version cannot read" in one_error_line(capsys)


def test_eval_given_urls_says_it_works_on_local_folders(home, photo_dir, capsys):
    assert main(["eval", "--model", "gs://bucket/store/models/m", "--photos", str(photo_dir), "--quiet"]) == 2
    assert "--model gs://bucket/store/models/m: eval works on local folders" in one_error_line(capsys)
    assert main(["eval", "--model", "m", "--photos", "gs://bucket/photos", "--quiet"]) == 2
    assert "--photos gs://bucket/photos: eval works on local folders" in one_error_line(capsys)


def test_a_second_training_of_the_same_name_on_this_machine_is_refused_while_the_first_runs(home, photo_dir,
                                                                                             style_image, capsys):
    import fcntl

    lock = home / "runs" / "train" / ".busy.lock"  # what a running `stylize train --name busy` holds
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "busy", *TINY]) == 2
        assert "another training of 'busy' is running on this machine" in one_error_line(capsys)
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "busy", *TINY]) == 0


def test_a_model_store_that_cannot_be_written_is_refused_before_any_training(photo_dir, style_image, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    home = tmp_path / "a_file" / "home"
    for command in (["prime", str(photo_dir), "--steps", "2", "--quiet"],
                    ["train", str(style_image), "--photos", str(photo_dir), "--name", "x", *TINY]):
        assert main([*command, "--home", str(home)]) == 2
        line = one_error_line(capsys)
        assert "the model store" in line and "cannot be written" in line


def test_a_style_image_too_thin_for_vgg_is_refused_before_any_training(home, photo_dir, tmp_path, capsys):
    Image.new("RGB", (500, 2), "orange").save(tmp_path / "thin.png")
    assert main(["train", str(tmp_path / "thin.png"), "--photos", str(photo_dir), "--name", "thin", *TINY]) == 2
    assert "at most 8 times longer than wide" in one_error_line(capsys)
    assert not list((home / "primed").glob("*"))  # nothing primed


def test_a_style_image_too_small_for_vgg_at_its_style_size_is_refused_before_any_training(home, photo_dir, tmp_path,
                                                                                         capsys):
    Image.new("RGB", (3, 3), "orange").save(tmp_path / "tiny.png")
    assert main(["train", str(tmp_path / "tiny.png"), "--photos", str(photo_dir), "--name", "tiny", *TINY]) == 2
    assert "short side is 3 px" in one_error_line(capsys)
    assert not list((home / "primed").glob("*"))  # nothing primed


def test_models_lists_trained_models(trained, capsys):
    assert main(["models"]) == 0
    assert "swirls" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["swirls"] and "history" not in listed[0]
    # a copy under another name is listed by the name --model takes; the name it was trained as is kept apart
    shutil.copytree(trained, trained.parent / "swirls-copy")
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["trained_as"]) for m in listed] == [("swirls", "swirls"), ("swirls-copy", "swirls")]
    # a model whose weights went missing is listed as unusable, not like the others
    (trained.parent / "swirls-copy" / "model.safetensors").unlink()
    assert main(["models"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("swirls-copy")]
    assert line.split(None, 1)[1] == "(unreadable: its weights (model.safetensors) are missing)"
    # weights a run would refuse (they were listed like the others): cut short, or one byte changed
    weights = (trained / "model.safetensors").read_bytes()
    (trained.parent / "swirls-copy" / "model.safetensors").write_bytes(weights[:3000])
    shutil.copytree(trained, trained.parent / "swirls-flipped")
    (trained.parent / "swirls-flipped" / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    assert main(["models"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert listed["swirls-copy"].startswith("(unreadable: its weights file (model.safetensors) is truncated")
    assert listed["swirls-flipped"].startswith("(unreadable: its weights file (model.safetensors) is corrupt or was modified")
    assert not listed["swirls"].startswith("(unreadable")


def test_output_cut_short_by_its_reader_ends_quietly(trained):
    reader_gone = subprocess.run(f"{sys.executable} -m stylize.cli models --json | true", shell=True,
                                 capture_output=True, text=True, env={**os.environ, "STYLIZE_HOME": str(trained.parent.parent)})
    assert "Traceback" not in reader_gone.stderr and "BrokenPipeError" not in reader_gone.stderr


def test_demo_runs_the_whole_job_on_the_first_limit_photos(home, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "4", *TINY]) == 0  # of the 5 bundled photos
    printed = capsys.readouterr().out
    assert "contact sheet" in printed and "style distance" in printed
    assert len(list((out / "stylized").glob("*.jpg"))) == 4  # it stylised all 5
    assert (out / "contact_sheet.png").is_file()
    assert json.loads((out / "evaluation.json").read_text())["images"] == 4


def test_demo_names_the_photos_it_could_not_stylise(home, photo_dir, tmp_path, capsys):
    (photo_dir / "broken.jpg").write_bytes(b"not really a jpeg")
    assert main(["demo", "--photos", str(photo_dir), "--out", str(tmp_path / "demo"), *TINY]) == 0
    captured = capsys.readouterr()
    assert f"not stylised: {photo_dir / 'broken.jpg'}" in captured.err  # it said nothing of them
    assert ", 1 not stylised (named above)" in captured.out


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda d: ["train", str(d["style"]), "--photos", str(d["tmp"] / "nope"), "--name", "x"], "photo folder not found"),
        (lambda d: ["train", str(d["tmp"] / "missing.jpg"), "--photos", str(d["photos"]), "--name", "x"], "style image not found"),
        (lambda d: ["train", str(d["text"]), "--photos", str(d["photos"]), "--name", "x"], "cannot read style image"),
        (lambda d: ["train", str(d["style"]), "--photos", str(d["photos"]), "--name", "../evil"], "invalid model name"),
        (lambda d: ["train", str(d["style"]), "--photos", str(d["photos"]), "--name", "x", "--style-layers", "relu4_3"],
         "'relu4_3' is not in these weights"),
        (lambda d: ["train", str(d["style"]), "--photos", str(d["empty"]), "--name", "x"], "no readable images"),
        (lambda d: ["train", str(d["style"]), "--photos", str(d["photos"]), "--name", "x", "--device", "cuda"], "no CUDA"),
        (lambda d: ["run", str(d["tmp"] / "nope"), str(d["tmp"] / "out"), "--model", "x"], "source folder not found"),
        (lambda d: ["run", str(d["photos"]), str(d["tmp"] / "out"), "--model", "nosuchmodel"], "no model 'nosuchmodel'"),
        (lambda d: ["run", str(d["photos"]), str(d["tmp"] / "out"), "--model", "x", "--format", "bmp"], "unknown output format"),
        (lambda d: ["eval", "--model", "nosuchmodel", "--photos", str(d["photos"])], "no model 'nosuchmodel'"),
        (lambda d: ["prime", str(d["tmp"] / "nope")], "photo folder not found"),
        (lambda d: ["train", str(d["style"]), "--photos", str(d["photos"]), "--name", "x", "--vgg-weights",
                    str(d["tmp"] / "vgg.pth")], "VGG weights file not found"),
    ],
)
def test_user_mistakes_give_exit_code_2_and_one_readable_line(make_args, message, home, photo_dir, style_image,
                                                               tmp_path, capsys):
    (tmp_path / "notes.jpg").write_text("just text")
    (tmp_path / "empty").mkdir()
    if "--device" in make_args({"style": 0, "photos": 0, "tmp": tmp_path, "text": 0, "empty": 0}):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    paths = {"style": style_image, "photos": photo_dir, "tmp": tmp_path, "text": tmp_path / "notes.jpg",
             "empty": tmp_path / "empty"}
    assert main(make_args(paths)) == 2
    assert message in one_error_line(capsys)


def test_existing_model_is_not_replaced_without_force(trained, photo_dir, style_image, capsys):
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "swirls", *TINY]) == 2
    assert "already exists" in one_error_line(capsys)


def test_a_model_is_replaced_whole_and_a_half_written_one_is_never_listed(trained, home, photo_dir, style_image,
                                                                          capsys):
    leftover = home / "models" / ".swirls.partial-0000"  # what an interrupted save leaves
    shutil.copytree(trained, leftover)
    (leftover / "style.jpg").unlink()
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "swirls", "--force", *TINY]) == 0
    assert {path.name for path in trained.iterdir()} >= {"model.safetensors", "model.json", "style.jpg"}
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    assert [model["name"] for model in json.loads(capsys.readouterr().out)] == ["swirls"]
    assert sorted(path.name for path in (home / "models").iterdir()) == [".swirls.partial-0000", "swirls"]


@pytest.mark.parametrize("arguments,message", [
    (["run", "a", "b", "--model", "m", "--batch-size", "0"], "must be between 1 and 65536"),
    (["train", "s.jpg", "--photos", "p", "--name", "x", "--lr", "nan"], "must be a finite number above zero"),
    (["train", "s.jpg", "--photos", "p", "--name", "x", "--lr", "-1"], "must be a finite number above zero"),
    (["train", "s.jpg", "--photos", "p", "--name", "x", "--epochs", "0"], "must be above 0 and at most 1,000,000"),
    (["prime", "p", "--epochs", "1e308"], "must be above 0 and at most 1,000,000"),
    (["train", "s.jpg", "--photos", "p", "--name", "x", "--seed", "99999999999999999999"], "must be between 0"),
    (["train", "s.jpg", "--photos", "p", "--name", "x", "--style-size", "1"], "must be at least 32 pixels"),
    (["train", "s.jpg", "--photos", "p", "--name", "x", "--style-weight", "inf"], "must be a finite number"),
    (["run", "a", "b", "--model", "m", "--retries", "-1"], "must be between 0 and 100"),
    # the stylize-bucket flow's own bounds, refused before a URL run starts it
    (["run", "a", "b", "--model", "m", "--retries", "101"], "must be between 0 and 100"),
    (["run", "a", "b", "--model", "m", "--journal-seconds", "0"], "must be above 0 and at most 86400"),
    (["run", "a", "b", "--model", "m", "--workers", "2000"], "must be between 0 and 1024"),
    (["run", "a", "b", "--model", "m", "--shard-size", "1000001"], "must be between 1 and 1000000"),
    (["train", "s.jpg", "--photos", "p", "--name", "x", "--steps", "3", "--epochs", "2"], "not allowed with"),
    (["models", "--model-store", "gs://b/store"], "unrecognized arguments: --model-store"),
    # it became the local folder "gs:/models", where no model was found
    (["models", "--home", "gs://models"], "--home: must be a folder on this machine, not gs://models"),
    (["run", "a", "b", "--model", "m", "--home", "gs://models"], "a model store at a URL is --model-store"),
])
def test_bad_option_values_are_usage_errors_with_exit_code_2(arguments, message, capsys):
    # refused before any work (these used to surface after priming, as tracebacks, or as a model of NaNs)
    with pytest.raises(SystemExit) as caught:
        main(arguments)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_files_where_folders_belong_and_broken_model_files_are_one_line_errors(trained, photo_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["run", str(next(photo_dir.rglob("*.jpg"))), str(tmp_path / "o"), "--model", "swirls"]) == 2
    assert "source is a file, not a folder" in one_error_line(capsys)
    assert main(["run", str(photo_dir), str(a_file), "--model", "swirls"]) == 2
    assert "destination is a file, not a folder" in one_error_line(capsys)
    (trained / "style.jpg").write_bytes(b"not a jpeg")
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--limit", "1"]) == 2
    assert "style image" in one_error_line(capsys)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--vgg-weights", str(empty)]) == 2
    assert "cannot read VGG weights" in one_error_line(capsys)
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--sheet", str(tmp_path / "sheet.xyz")]) == 2
    assert "name a .png, .jpg or .webp file" in one_error_line(capsys)
    assert main(["eval", "--model", "swirls", "--photos", str(photo_dir), "--sheet", str(a_file / "s.png")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert main(["demo", "--photos", str(photo_dir), "--out", str(photo_dir / "demo"), "--quiet"]) == 2
    assert "lies inside the photo folder" in one_error_line(capsys)
    odd = trained.parent / "odd"
    odd.mkdir()
    (odd / "model.json").write_text("[1]")
    assert main(["models"]) == 0
    assert "odd" in capsys.readouterr().out
    (tmp_path / "no-file" / "model.json").mkdir(parents=True)
    assert main(["run", str(photo_dir), str(tmp_path / "o2"), "--model", str(tmp_path / "no-file")]) == 2
    assert "model.json is not a file" in one_error_line(capsys)
    unnamed = trained.parent / "unnamed"
    shutil.copytree(trained, unnamed)
    (unnamed / "model.json").write_text(json.dumps({**json.loads((trained / "model.json").read_text()), "name": 7}))
    assert main(["run", str(photo_dir), str(tmp_path / "o3"), "--model", "unnamed"]) == 2
    assert '"name" is not text' in one_error_line(capsys)


def test_a_stored_model_is_found_by_name_whatever_the_current_folder_holds(trained, photo_dir, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "swirls").write_text("notes that happen to share the model's name")
    assert main(["run", str(photo_dir), str(tmp_path / "out"), "--model", "swirls", "--quiet"]) == 0
    assert "written" in capsys.readouterr().out


def test_a_model_store_with_a_file_where_its_folders_go_is_refused_before_any_training(photo_dir, style_image,
                                                                                      tmp_path, capsys):
    for folder in ("models", "primed", "runs"):
        home = tmp_path / folder
        home.mkdir()
        (home / folder).write_text("in the way")
        assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "x", "--home", str(home),
                     *TINY]) == 2
        line = one_error_line(capsys)
        assert "cannot be written" in line and str(home / folder) in line
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "x.safetensors", *TINY]) == 2
    assert "must not end in .safetensors" in one_error_line(capsys)
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "line\n", *TINY]) == 2
    assert "invalid model name" in capsys.readouterr().err


def run_console_script(*args, env_extra=None, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STYLIZE_VGG_WEIGHTS"}
    env.update({"STYLIZE_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch")}, **(env_extra or {}))
    return subprocess.run([str(STYLIZE), *args], capture_output=True, text=True, env=env, timeout=300)


def test_console_script_offline_without_vgg_weights_names_the_option_and_variable(photo_dir, style_image, tmp_path):
    # An unreachable proxy makes torchvision's download fail at once, as it does on a machine without internet.
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run_console_script("train", str(style_image), "--photos", str(photo_dir), "--name", "x", *TINY,
                                env_extra=offline, tmp_path=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("stylize: error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "--vgg-weights" in errors[0] and "STYLIZE_VGG_WEIGHTS" in errors[0]


def test_console_script_help_lists_every_command(tmp_path):
    result = run_console_script("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for command in ("prime", "train", "run", "eval", "models", "demo"):
        assert command in result.stdout


def test_an_interrupted_training_resumes_when_the_same_command_is_run_again(photo_dir, style_image, tmp_path, vgg_weights):
    home = tmp_path / "home"
    command = ["train", str(style_image), "--photos", str(photo_dir), "--name", "long", "--steps", "150",
               "--prime-steps", "2", "--image-size", "32", "--batch-size", "2", "--style-size", "64",
               "--checkpoint-every", "5", "--vgg-weights", str(vgg_weights)]
    env = {**os.environ, "STYLIZE_HOME": str(home), "TORCH_HOME": str(tmp_path / "torch")}
    process = subprocess.Popen([str(STYLIZE), *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    state = home / "runs" / "train" / "long" / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(), "no training state was checkpointed"
    # SIGTERM, as a scheduler sends; a SIGINT would be ignored where the tests run as a background job
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    saved_step = json.loads(state.read_text())["step"]

    result = subprocess.run([str(STYLIZE), *command, "--quiet"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    resumed = int(result.stderr.split("resumed from step ")[1].split()[0])
    assert resumed >= saved_step and resumed % 5 == 0
    metadata = json.loads((home / "models" / "long" / "model.json").read_text())
    assert metadata["steps"] == 150
    assert not (home / "runs" / "train" / "long").exists()


def test_prefect_s_temporary_server_gets_two_minutes_to_start_and_no_telemetry_unless_the_environment_says_otherwise(
        monkeypatch):
    from stylize.cli import ANALYTICS_VARIABLE, EPHEMERAL_STARTUP_VARIABLE, prefect_defaults

    monkeypatch.delitem(sys.modules, "prefect", raising=False)  # as in a fresh `stylize` process
    monkeypatch.delenv(EPHEMERAL_STARTUP_VARIABLE, raising=False)
    monkeypatch.delenv(ANALYTICS_VARIABLE, raising=False)
    prefect_defaults(quiet=False)
    assert os.environ[EPHEMERAL_STARTUP_VARIABLE] == "120" and os.environ[ANALYTICS_VARIABLE] == "false"
    monkeypatch.setenv(EPHEMERAL_STARTUP_VARIABLE, "45")
    monkeypatch.setenv(ANALYTICS_VARIABLE, "true")
    prefect_defaults(quiet=False)
    assert os.environ[EPHEMERAL_STARTUP_VARIABLE] == "45" and os.environ[ANALYTICS_VARIABLE] == "true"


def test_ctrl_c_stops_a_run_on_urls_at_once_with_the_interruption_recorded_and_the_rerun_resumes(tmp_path,
                                                                                                  monkeypatch):
    from stylecore.checkpoint import save_model
    from stylecore.model import UNet, UNetConfig

    store, source, destination = tmp_path / "store", tmp_path / "in", tmp_path / "out"
    save_model(store / "models" / "m", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "m"})
    source.mkdir()
    for index in range(400):
        Image.new("RGB", (32, 32), (index % 256, 80, 160)).save(source / f"{index:04}.jpg")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no server running: the run starts a temporary one
    env = {**os.environ, "STYLIZE_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect")}
    command = [str(STYLIZE), "run", source.as_uri(), destination.as_uri(), "--model", "m", "--model-store",
               store.as_uri(), "--shard-size", "200", "--batch-size", "1", "--workers", "1", "--journal-seconds", "0.2"]
    # Ctrl-C in a terminal: SIGINT to every process of the command's group. A test run in the background ignores
    # SIGINT, and its children would too: the command starts with it restored (exec, not preexec_fn: threads).
    restored = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                                      "os.execv(sys.argv[1], sys.argv[1:])"]
    process = subprocess.Popen([*restored, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    parts = destination / "_manifest_parts"
    while not any(parts.glob("*.journal/*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # both shards are running (in the flow's two threads), with rows journaled
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)  # it used to wait minutes for the server Ctrl-C had also stopped
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-2:][0].startswith("stylize: interrupted; run the same command again")
    assert "Traceback" not in stderr and "Unable to connect" not in stderr
    assert "Finished in state Crashed('Execution was aborted by an interrupt signal.')" in stderr  # recorded
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # nothing of it left running, the temporary server included
        os.killpg(process.pid, 0)

    result = subprocess.run([*command, "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written, done = (int(result.stdout.split(word)[0].split()[-1]) for word in (" written", " already done"))
    assert done > 0 and written + done == 400, result.stdout
    assert written > 0, "the running shards went on to their ends after Ctrl-C"  # they stop at their next image


def test_ctrl_c_stops_a_training_on_urls_at_once_and_saves_no_model(photo_dir, style_image, tmp_path, monkeypatch,
                                                                     vgg_weights):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    store = tmp_path / "store"
    env = {**os.environ, "STYLIZE_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "STYLIZE_VGG_WEIGHTS": str(vgg_weights)}
    command = [str(STYLIZE), "train", str(style_image), "--photos", photo_dir.as_uri(), "--name", "long",
               "--model-store", str(store), "--steps", "100000", "--prime-steps", "2", "--image-size", "32",
               "--batch-size", "2", "--style-size", "64"]
    restored = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                                      "os.execv(sys.argv[1], sys.argv[1:])"]  # as in the test above
    process = subprocess.Popen([*restored, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(store.glob("primed/*/model.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # into the style training
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)
    # the training ran in a task runner's thread, which Ctrl-C does not reach: it went on to its end and saved
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "stylize: interrupted; training on URLs keeps no state: the same command starts it again" in stderr
    assert "Traceback" not in stderr
    assert not (store / "models" / "long").exists()


def test_a_temporary_server_that_does_not_start_in_time_is_one_line_naming_the_fixes(photo_dir, tmp_path,
                                                                                     monkeypatch):
    from stylecore.checkpoint import save_model
    from stylecore.model import UNet, UNetConfig

    store = tmp_path / "store"
    save_model(store / "models" / "m", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "m"})
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no server running: the run starts a temporary one
    slow = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    result = run_console_script("run", str(photo_dir), str(tmp_path / "out"), "--model", "m", "--model-store",
                                store.as_uri(), "--quiet", env_extra=slow, tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stylize: error: Prefect's temporary server did not start within 1 s"), result.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in last and "PREFECT_API_URL" in last
