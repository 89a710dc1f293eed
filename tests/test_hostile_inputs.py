"""Hostile and odd inputs: each ends as exactly one ``ok`` row (handled correctly) or one ``error`` row with a
clear reason. Never a crashed shard, never a silent drop, never an output outside the destination."""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import hostile_corpus
from stylecore.checkpoint import save_model
from stylecore.model import UNet, UNetConfig
from stylize.cli import main
from tasks.bucket import ShardOptions, list_shards, stylize_shard
from tasks.storage import Location


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path / "model", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "tiny"})


def files_under(folder: Path) -> set[str]:
    return {str(path) for path in folder.rglob("*") if path.is_file() and not path.is_symlink()}


def test_every_hostile_input_gets_one_row_with_the_right_outcome(tmp_path, tiny_model_dir, monkeypatch, capsys):
    source, outside, destination = tmp_path / "in", tmp_path / "elsewhere", tmp_path / "out"
    expected = hostile_corpus.build(source, outside)
    assert len(expected) >= 25
    before = files_under(tmp_path)

    code = main(["run", str(source), str(destination), "--model", str(tiny_model_dir), "--quiet",
                 "--max-pixels", str(hostile_corpus.MAX_PIXELS), "--max-bytes", str(hostile_corpus.MAX_BYTES),
                 "--shard-size", "7", "--home", str(tmp_path / "home")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err + captured.out

    rows = pq.read_table(destination / "manifest.parquet").to_pylist()
    by_input = {}
    for row in rows:
        relative = os.path.relpath(row["input_uri"], source)
        assert relative not in by_input, f"two rows for {relative}"
        by_input[relative] = row
    assert set(by_input) == set(expected), "every input, and nothing else, has a row"

    for name, expect in expected.items():
        row = by_input[name]
        assert row["status"] == expect.status, (name, row["error"])
        if expect.status == "ok":
            output = Path(row["output_uri"])
            assert output.is_relative_to(destination)
            with Image.open(output) as image:
                image.load()
                assert image.size == expect.size, name
            assert (row["width"], row["height"]) == expect.size
        else:
            assert expect.reason in row["error"], (name, row["error"])
            assert "\n" not in row["error"] and row["output_uri"] is None

    written = files_under(tmp_path) - before
    assert written and all(Path(path).is_relative_to(destination) for path in written)
    oks = sum(expect.status == "ok" for expect in expected.values())
    assert f"{oks} written" in captured.out
    assert not [path for path in written if path.endswith(".partial")]


def test_an_output_path_through_a_link_in_the_destination_is_refused(tmp_path, tiny_model_dir):
    """A destination folder that is a symbolic link to elsewhere must not carry outputs out of the destination."""
    source, destination, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "a.jpg").write_bytes(hostile_corpus.encoded(hostile_corpus.photo(), "JPEG"))
    (source / "b.jpg").write_bytes(hostile_corpus.encoded(hostile_corpus.photo(), "JPEG"))
    elsewhere.mkdir()
    destination.mkdir()
    os.symlink(elsewhere, destination / "sub")

    from stylecore.checkpoint import load_model
    model, _ = load_model(tiny_model_dir)
    source_location, destination_location = Location(str(source)), Location(str(destination))
    shard, = list_shards(source_location, 10)
    result = stylize_shard(shard, source_location, destination_location, {"tiny": model.eval()}, ShardOptions())
    assert result.counts == {"ok": 1, "skipped": 0, "error": 1}
    assert list(elsewhere.iterdir()) == []
    rows = {Path(row["input_uri"]).name: row for row in pq.read_table(pa.BufferReader(
        (destination / "_manifest_parts" / f"{shard.shard_id}.parquet").read_bytes())).to_pylist()}
    assert "outside the destination" in rows["a.jpg"]["error"]


def test_object_names_with_dot_segments_and_slashes_stay_inside_the_destination(tmp_path, tiny_model_dir):
    """Object stores allow any key; '..', '.', '//' and a leading '/' must not lead outputs out of the prefix,
    nor make two inputs share one output. (fsspec's in-memory store keeps keys as given, like GCS and S3;
    the GCS emulator refuses '..'.)"""
    from stylecore.checkpoint import load_model

    root = f"memory://hostile-{tmp_path.name}"
    fs, _ = Location(root).filesystem()
    keys = ["a/../../escape.jpg", "/leading.jpg", "//double.jpg", "./dot.jpg", "escape.jpg", "leading.jpg", "ok.jpg"]
    data = hostile_corpus.encoded(hostile_corpus.photo(), "JPEG")
    for key in keys:
        fs.pipe_file(f"/hostile-{tmp_path.name}/in/{key}", data)
    model, _ = load_model(tiny_model_dir)
    source, destination = Location(f"{root}/in"), Location(f"{root}/out")
    shard, = list_shards(source, 10)
    assert sorted(shard.keys) == sorted(keys)
    result = stylize_shard(shard, source, destination, {"tiny": model.eval()}, ShardOptions())
    assert result.counts == {"ok": len(keys), "skipped": 0, "error": 0}
    outputs = [path for path in fs.find(f"/hostile-{tmp_path.name}") if "_manifest_parts" not in path
               and "/in/" not in path]
    assert len(outputs) == len(keys), outputs
    prefix = f"/hostile-{tmp_path.name}/out/"
    assert all(path.startswith(prefix) and "/." not in path[len(prefix) - 1:] and "//" not in path for path in outputs)
