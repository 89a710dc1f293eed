"""Bucket stylisation without Prefect: stable shards, one manifest row per image and model, skip-if-done,
bad images as error rows, storage failures as exceptions, on local disk, memory:// and a GCS emulator."""

import io
import threading
import uuid
from dataclasses import replace

import fsspec
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from stylecore.model import UNet, UNetConfig
from tasks import manifest
from tasks.bucket import ShardOptions, list_shards, make_shards, output_key, part_location, safe_relative, stylize_shard
from tasks.storage import Location, StorageError


def tiny_model(seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(base_channels=4, depth=2)).eval()


def jpeg(color, size=(20, 14)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def fill(location: Location, files: dict[str, bytes]) -> None:
    fs, root = location.filesystem()
    for key, data in files.items():
        fs.makedirs(f"{root}/{key}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{root}/{key}", data)


FILES = {"a.jpg": jpeg("red"), "nested/b.jpg": jpeg("green", (9, 31)), "nested/deeper/c.png": jpeg("blue"),
         "broken.jpg": b"\xff\xd8\xff garbage", "notes.txt": b"not an image"}


def read_outputs(location: Location) -> dict[str, tuple[int, int]]:
    fs, root = location.filesystem()
    found = {}
    for path in fs.find(root):
        relative = path[len(root):].lstrip("/")
        if relative.startswith("_manifest_parts"):
            continue
        found[relative] = Image.open(io.BytesIO(fs.cat_file(path))).size
    return found


def test_shards_are_stable_and_change_only_where_the_bucket_changed():
    listing = [(f"img{i:03}.jpg", 100 + i, "t") for i in range(10)]
    first, again = make_shards(listing, 4), make_shards(list(listing), 4)
    assert [s.shard_id for s in first] == [s.shard_id for s in again]
    assert [len(s) for s in first] == [4, 4, 2]
    changed = list(listing)
    changed[5] = ("img005.jpg", 999, "t")
    ids = [s.shard_id for s in make_shards(changed, 4)]
    assert ids[0] == first[0].shard_id and ids[2] == first[2].shard_id and ids[1] != first[1].shard_id


def test_keys_never_climb_out_of_the_destination_and_never_share_an_output():
    assert safe_relative("a/b.jpg") == "a/b.jpg"
    assert safe_relative("../../etc/passwd").startswith("etc/passwd.")
    assert safe_relative("/abs//./x.jpg").startswith("abs/x.")
    assert output_key("a/../../b.png", "m", False, "jpeg").startswith("a/b.")
    assert output_key("a/b.png", "m", True, "webp") == "m/a/b.webp"
    assert output_key("b.png", "../../elsewhere", True, "jpeg").startswith("elsewhere.")  # a model's own name too
    keys = ["b.jpg", "a/../b.jpg", "./b.jpg", "/b.jpg", "b.JPG", "b.png"]
    shard, = make_shards([(key, 1, "") for key in keys], 10)
    outputs = [output_key(key, "m", False, "jpeg", key in shard.clashing) for key in keys]
    assert len(set(outputs)) == len(keys) and all(".." not in o and not o.startswith("/") for o in outputs)
    with pytest.raises(ValueError, match="no usable path segments"):
        safe_relative("../..")


def test_over_long_names_are_shortened_to_what_file_systems_accept():
    key = "deep/" + "é" * 300 + ".jpg"
    short = output_key(key, "m", False, "png")
    assert all(len(segment.encode()) <= 255 for segment in short.split("/")) and short.endswith(".png")
    assert short != output_key("deep/" + "é" * 301 + ".jpg", "m", False, "png")


@pytest.mark.parametrize("scheme", ["local", "file", "memory"])
def test_a_shard_writes_outputs_and_one_manifest_row_per_image(scheme, tmp_path):
    if scheme == "local":
        source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    elif scheme == "file":
        source, destination = Location(f"file://{tmp_path}/in"), Location(f"file://{tmp_path}/out")
    else:
        run = uuid.uuid4().hex[:8]
        source, destination = Location(f"memory://{run}/in"), Location(f"memory://{run}/out")
    fill(source, FILES)
    [shard] = list_shards(source, shard_size=100)
    assert shard.keys == ("a.jpg", "broken.jpg", "nested/b.jpg", "nested/deeper/c.png")

    result = stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2))
    assert result.counts == {"ok": 3, "skipped": 0, "error": 1}
    assert read_outputs(destination) == {"a.jpg": (20, 14), "nested/b.jpg": (9, 31), "nested/deeper/c.jpg": (20, 14)}

    table = manifest.read_table(part_location(destination, shard.shard_id))
    rows = {r["input_uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}
    assert rows["broken.jpg"]["status"] == "error" and "\n" not in rows["broken.jpg"]["error"]
    assert rows["b.jpg"]["width"] == 9 and rows["b.jpg"]["height"] == 31 and rows["b.jpg"]["output_bytes"] > 0
    assert all(r["shard_id"] == shard.shard_id for r in rows.values())

    # A rerun skips what is done; an output that disappeared is redone.
    fs, root = destination.filesystem()
    fs.rm_file(f"{root}/a.jpg")
    again = stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2))
    assert again.counts == {"ok": 1, "skipped": 2, "error": 1}
    assert "a.jpg" in read_outputs(destination)


def test_several_models_give_one_output_and_row_per_image_and_model(tmp_path):
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {"a.jpg": jpeg("red"), "b.jpg": jpeg("blue")})
    [shard] = list_shards(source, 10)
    result = stylize_shard(shard, source, destination, {"one": tiny_model(1), "two": tiny_model(2)},
                           ShardOptions(output_format="png"))
    assert result.counts["ok"] == 4
    assert set(read_outputs(destination)) == {"one/a.png", "one/b.png", "two/a.png", "two/b.png"}


class FailingWrites(MemoryFileSystem):
    """A real in-memory filesystem whose first ``budget`` writes fail, like a flaky object store."""

    protocol = "flakymem"
    budget = 0
    lock = threading.Lock()  # writes come from several threads: exactly ``budget`` of them fail

    def pipe_file(self, path, value, **kwargs):
        with FailingWrites.lock:
            failing = FailingWrites.budget > 0
            FailingWrites.budget -= failing
        if failing:
            raise OSError("simulated storage write failure")
        return super().pipe_file(path, value, **kwargs)


def test_storage_write_failures_fail_the_shard_and_leave_no_manifest_part():
    fsspec.register_implementation("flakymem", FailingWrites, clobber=True)
    run = uuid.uuid4().hex[:8]
    source, destination = Location(f"memory://{run}/in"), Location(f"flakymem://{run}/out")
    fill(source, {"a.jpg": jpeg("red"), "b.jpg": jpeg("blue")})
    [shard] = list_shards(source, 10)
    FailingWrites.budget = 1
    with pytest.raises(OSError, match="simulated storage write failure"):
        stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions())
    assert manifest.read_table(part_location(destination, shard.shard_id)) is None
    result = stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions())
    assert result.counts == {"ok": 1, "skipped": 1, "error": 0}  # the output written before the failure is kept


def test_the_manifest_part_has_typed_columns(tmp_path):
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {"a.jpg": jpeg("red")})
    [shard] = list_shards(source, 10)
    stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions(flow_run_id="run-1"))
    table = pq.read_table(part_location(destination, shard.shard_id).url)
    assert table.schema.equals(manifest.SCHEMA, check_metadata=False)
    assert str(table.schema.field("finished_at").type) == "timestamp[us, tz=UTC]"
    assert table.column("flow_run_id").to_pylist() == ["run-1"]


def test_a_gcs_bucket_is_read_and_written_through_gcsfs(gcs_emulator):
    run = uuid.uuid4().hex[:8]
    source = Location(f"gs://photos/{run}/in", gcs_emulator)
    destination = Location(f"gs://photos/{run}/out", gcs_emulator)
    fill(source, {"a.jpg": jpeg("red"), "sub/b.jpg": jpeg("green"), "bad.jpg": b"nope"})
    [shard] = list_shards(source, 10)
    result = stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions())
    assert result.counts == {"ok": 2, "skipped": 0, "error": 1}
    assert set(read_outputs(destination)) == {"a.jpg", "sub/b.jpg"}
    assert result.part_uri.startswith("gs://photos/")


def test_an_object_beside_a_prefix_of_the_same_name_is_one_input(gcs_emulator):
    source = Location(f"gs://photos/{uuid.uuid4().hex[:8]}/in", gcs_emulator)
    fill(source, {"x.jpg": jpeg("red"), "x.jpg/y.jpg": jpeg("green")})
    [shard] = list_shards(source, 10)
    assert shard.keys == ("x.jpg", "x.jpg/y.jpg") and shard.problems == () and not shard.clashing


def test_object_names_with_url_like_characters_are_stylised_like_any_other(gcs_emulator):
    run = uuid.uuid4().hex[:8]
    source = Location(f"gs://photos/{run}/in", gcs_emulator)
    destination = Location(f"gs://photos/{run}/out", gcs_emulator)
    names = ["10::30 sunrise.jpg", "a#b.jpg", "100% c.jpg", "d?e=f.jpg"]
    fill(source, {name: jpeg("red") for name in names})
    [shard] = list_shards(source, 10)
    result = stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions())
    assert result.counts == {"ok": 4, "skipped": 0, "error": 0}
    assert set(read_outputs(destination)) == set(names)


def test_chained_urls_still_reach_into_archives(tmp_path):
    import zipfile

    from tasks.storage import read_bytes

    with zipfile.ZipFile(tmp_path / "styles.zip", "w") as archive:
        archive.writestr("starry.jpg", jpeg("navy"))
    assert read_bytes(Location(f"zip://starry.jpg::file://{tmp_path}/styles.zip")) == jpeg("navy")


def test_listing_a_bucket_leaves_no_copy_of_its_objects_metadata_in_memory(gcs_emulator):
    # gcsfs caches every object a find returns, for as long as the process lives: about 1.7 GB for a million images
    source = Location(f"gs://photos/{uuid.uuid4().hex[:8]}/in", gcs_emulator)
    fill(source, {f"{folder}/{index}.jpg": b"x" for folder in ("a", "b/c") for index in range(3)})
    fs, root = source.filesystem()
    assert sum(len(shard) for shard in list_shards(source, 4)) == 6
    assert [key for key in fs.dircache if key == root or key.startswith(root + "/")] == []


def test_a_bucket_read_page_by_page_lists_what_gcsfs_find_would(gcs_emulator):
    # gcsfs's find holds every object's details at once (about 3.7 KB each: gigabytes for millions of images)
    from tasks import storage

    source = Location(f"gs://photos/{uuid.uuid4().hex[:8]}/in", gcs_emulator)
    keys = ["a.jpg", "b.JPG", "sub/c.png", "sub/deeper/d.jpg", "folder.jpg/inner.jpg", "notes.txt",
            *(f"many/{index:02d}.jpg" for index in range(7))]
    fill(source, {key: key.encode() for key in keys})
    fs, root = source.filesystem()
    fs.pipe_file(f"{root}/placeholder.jpg/", b"")  # a console's empty "folder" object
    found = fs.find(root, detail=True, withdirs=True)
    expected = {path.rstrip("/"): (info["type"], info["size"], info.get("etag")) for path, info in found.items()
                if path.rstrip("/") != root and not (path.endswith("/") and info["type"] == "file")}
    fs.invalidate_cache()
    # The emulator answers a listing in one page whatever maxResults asks; GCS gives at most 1,000 and a token
    # for the next, which is followed as gcsfs's find does.
    paged = {path: (info["type"], info["size"], info.get("etag")) for path, info in storage._gcs_entries(fs, root)}
    assert paged == expected
    listed = storage.list_files(source)
    assert [entry.key for entry in listed] == ["a.jpg", "b.JPG", "folder.jpg", "folder.jpg/inner.jpg",
                                               *(f"many/{index:02d}.jpg" for index in range(7)), "placeholder.jpg",
                                               "sub/c.png", "sub/deeper/d.jpg"]
    assert [entry.key for entry in listed if entry.problem] == ["folder.jpg", "placeholder.jpg"]


def test_a_destination_that_holds_the_source_is_refused_and_one_inside_it_is_left_out(gcs_emulator):
    site = Location(f"gs://photos/{uuid.uuid4().hex[:8]}/site", gcs_emulator)
    fill(site, {"incoming/a.jpg": b"x", "incoming/b/c.jpg": b"x", "incoming/out/old.jpg": b"x"})
    source = site.child("incoming")
    with pytest.raises(StorageError, match="lies inside the destination"):
        list_shards(source, 4, exclude=site)
    with pytest.raises(StorageError, match="is the source itself"):
        list_shards(source, 4, exclude=source)
    [shard] = list_shards(source, 4, exclude=source.child("out"))
    assert shard.keys == ("a.jpg", "b/c.jpg")


def test_a_rerun_after_inputs_were_added_or_removed_early_in_the_listing_redoes_only_those(tmp_path):
    # Shards are slices of the sorted listing: one input more or less near the start shifts every later shard
    # (new ids); their inputs' earlier outputs must still count as done.
    import os

    from tasks.bucket import run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {f"img{index:02}.jpg": jpeg((index * 20, 90, 200)) for index in range(12)})
    models, options = {"m": tiny_model()}, ShardOptions(batch_size=4)
    assert run_shards(source, destination, models, options, 4)["counts"] == {"ok": 12, "skipped": 0, "error": 0}

    fill(source, {"aaa.jpg": jpeg("red")})
    again = run_shards(source, destination, models, options, 4)
    assert again["counts"] == {"ok": 1, "skipped": 12, "error": 0} and again["redone"] == 1

    os.remove(tmp_path / "in" / "img00.jpg")
    changed = tmp_path / "in" / "img05.jpg"
    changed.write_bytes(jpeg("blue"))
    os.utime(changed, (changed.stat().st_atime, changed.stat().st_mtime + 10))  # a new version
    third = run_shards(source, destination, models, options, 4)
    assert third["counts"] == {"ok": 1, "skipped": 11, "error": 0} and third["redone"] == 1
    rows = manifest.read_table(destination.child("manifest.parquet")).to_pylist()
    assert len(rows) == 12 and {row["input_uri"].rsplit("/", 1)[1] for row in rows if row["status"] == "ok"} == {
        "img05.jpg"}


def test_an_earlier_output_counts_as_done_only_where_this_run_would_write_it(tmp_path):
    import shutil

    import numpy as np

    from tasks.bucket import run_shards

    def rows(destination: Location) -> dict[str, dict]:
        table = manifest.read_table(destination.child("manifest.parquet"))
        return {row["input_uri"].rsplit("/", 1)[1]: row for row in table.to_pylist()}

    def pixels(path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"), dtype=int)

    source, first = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {"a.png": jpeg("red"), "b.jpg": jpeg("green")})
    models, options = {"m": tiny_model()}, ShardOptions(batch_size=4)
    assert run_shards(source, first, models, options)["counts"]["ok"] == 2

    # The destination moved: its manifest names the old place, so everything is written again, in the new one.
    shutil.move(tmp_path / "out", tmp_path / "moved")
    moved = Location(str(tmp_path / "moved"))
    assert run_shards(source, moved, models, options)["counts"] == {"ok": 2, "skipped": 0, "error": 0}
    assert {row["output_uri"] for row in rows(moved).values()} == {f"{tmp_path}/moved/a.jpg", f"{tmp_path}/moved/b.jpg"}

    # PNG, then JPEG again: the rows name the JPEG files, which this run wrote.
    run_shards(source, moved, models, ShardOptions(batch_size=4, output_format="png"))
    assert run_shards(source, moved, models, options)["counts"]["ok"] == 2
    assert all(row["output_uri"].endswith(".jpg") and row["status"] == "ok" for row in rows(moved).values())

    # a.jpg arrives beside a.png (both outputs get a hashed name), then a.png goes: a.jpg's output takes the plain
    # name, which held a.png's picture until now.
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg("blue"))
    run_shards(source, moved, models, options)
    hashed = rows(moved)["a.jpg"]["output_uri"]
    assert hashed != f"{tmp_path}/moved/a.jpg"
    (tmp_path / "in" / "a.png").unlink()
    assert run_shards(source, moved, models, options)["counts"] == {"ok": 1, "skipped": 1, "error": 0}
    assert rows(moved)["a.jpg"]["output_uri"] == f"{tmp_path}/moved/a.jpg"
    assert np.abs(pixels(tmp_path / "moved" / "a.jpg") - pixels(hashed)).max() <= 2


def test_a_local_file_name_that_is_not_utf8_is_stylised_and_recorded_with_its_bytes_escaped(tmp_path):
    import os

    from tasks.bucket import run_shards

    latin1 = os.fsdecode(b"caf\xe9.jpg")  # an old archive's Latin-1 name: Python holds it as a lone surrogate
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / latin1).write_bytes(jpeg("red"))
    (tmp_path / "in" / "plain.jpg").write_bytes(jpeg("green"))
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    models, options = {"m": tiny_model()}, ShardOptions(batch_size=4)
    assert run_shards(source, destination, models, options)["counts"] == {"ok": 2, "skipped": 0, "error": 0}
    assert (tmp_path / "out" / latin1).is_file()  # under its own bytes
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert {row["input_uri"] for row in rows} == {f"{tmp_path}/in/caf\\xe9.jpg", f"{tmp_path}/in/plain.jpg"}
    assert run_shards(source, destination, models, options)["counts"] == {"ok": 0, "skipped": 2, "error": 0}


def test_something_left_in_an_outputs_way_in_the_destination_is_that_outputs_error_row(tmp_path):
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, FILES)
    (tmp_path / "out" / "a.jpg").mkdir(parents=True)  # a folder where a.jpg's output goes
    (tmp_path / "out" / "nested").write_text("a file where nested/b.jpg's folder goes")
    [shard] = list_shards(source, shard_size=100)
    result = stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2))
    rows = {r["input_uri"].rsplit("/", 1)[-1]: r for r in
            manifest.read_table(part_location(destination, shard.shard_id)).to_pylist()}
    assert result.counts == {"ok": 0, "skipped": 0, "error": 4}
    assert "a folder of that name is in the output's way" in rows["a.jpg"]["error"]
    assert "a file is in the way of the output's folder" in rows["b.jpg"]["error"]
    assert "a file is in the way" in rows["c.png"]["error"]  # nested/deeper/c.jpg
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_after_an_interrupted_run_new_inputs_early_in_the_listing_do_not_cost_its_finished_work(tmp_path):
    from tasks.bucket import PARTS_FOLDER, run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {f"img{index:02}.jpg": jpeg((index * 20, 90, 200)) for index in range(12)})
    models, options = {"m": tiny_model()}, ShardOptions(batch_size=4)
    other = Location(str(tmp_path / "other"))  # another source's run into the same destination: its records stay
    fill(other, {"zzz.jpg": jpeg("white")})
    [other_shard] = list_shards(other, 4)
    run_shards(other, destination, models, options, 4)
    # An interrupted run: two of its three shards finished, and it never wrote a manifest.
    for shard in list_shards(source, 4)[:2]:
        stylize_shard(shard, source, destination, models, options)

    (tmp_path / "out" / "manifest.parquet").unlink()  # the other source's: this source's run never wrote one
    fill(source, {"aaa.jpg": jpeg("red")})  # every shard gets a new id
    again = run_shards(source, destination, models, options, 4)
    assert again["counts"] == {"ok": 5, "skipped": 8, "error": 0}  # the new image and the unfinished shard's four
    assert again["pruned_shard_records"] == 2  # the interrupted run's records, now carried into the new shards
    parts = sorted(path.name for path in (tmp_path / "out" / PARTS_FOLDER).glob("*.parquet"))
    assert parts == sorted(f"{shard.shard_id}.parquet" for shard in [*list_shards(source, 4), other_shard])
    assert run_shards(source, destination, models, options, 4)["counts"] == {"ok": 0, "skipped": 13, "error": 0}


def test_a_rerun_over_a_memory_store_redoes_an_image_whose_content_changed():
    # memory:// gives no etag or mtime: its creation time is the version, so a rewritten image is not carried over
    from tasks.bucket import run_shards

    run = uuid.uuid4().hex[:8]
    source, destination = Location(f"memory://{run}/in"), Location(f"memory://{run}/out")
    fill(source, {f"img{index}.jpg": jpeg((index * 40, 90, 200)) for index in range(5)})
    models, options = {"m": tiny_model()}, ShardOptions(batch_size=4)
    run_shards(source, destination, models, options, 2)
    fill(source, {"img3.jpg": jpeg("yellow", (30, 20)), "aaa.jpg": jpeg("red")})  # changed; added early
    again = run_shards(source, destination, models, options, 2)
    assert again["counts"] == {"ok": 2, "skipped": 4, "error": 0}
    rows = {row["input_uri"].rsplit("/", 1)[1]: row for row in
            manifest.read_table(destination.child("manifest.parquet")).to_pylist()}
    assert rows["img3.jpg"]["status"] == "ok" and rows["img3.jpg"]["width"] == 30 and rows["img3.jpg"]["input_version"]


def test_a_model_retrained_under_the_same_name_restyles_everything_and_the_same_weights_skip_it(tmp_path):
    from tasks.bucket import run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {f"img{index}.jpg": jpeg((index * 40, 90, 200)) for index in range(5)})
    options = ShardOptions(batch_size=4)
    assert run_shards(source, destination, {"m": tiny_model(seed=0)}, options, 2)["counts"]["ok"] == 5
    retrained = run_shards(source, destination, {"m": tiny_model(seed=1)}, options, 2)
    assert retrained["counts"] == {"ok": 5, "skipped": 0, "error": 0}
    same_weights = run_shards(source, destination, {"m": tiny_model(seed=1)}, options, 2)  # loaded afresh
    assert same_weights["counts"] == {"ok": 0, "skipped": 5, "error": 0}
    rows = manifest.read_table(destination.child("manifest.parquet")).to_pylist()
    assert len({row["model_weights"] for row in rows}) == 1 and rows[0]["model_weights"]


def test_a_rerun_at_another_quality_encodes_the_lossy_outputs_again_but_not_the_png_ones(tmp_path):
    from tasks.bucket import SAME_FORMAT, run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    # "x?sig=1.jpg": a name that looks like a signed URL's parameter; "d.JPEG" keeps its own extension
    fill(source, {"a.jpg": jpeg("red"), "x?sig=1.jpg": jpeg("green"), "c.png": jpeg("blue"), "d.JPEG": jpeg("gray")})
    model = tiny_model()
    same_format = ShardOptions(batch_size=4, output_format=SAME_FORMAT)
    assert run_shards(source, destination, {"m": model}, same_format, 10)["counts"]["ok"] == 4
    before = (tmp_path / "out" / "a.jpg").read_bytes()
    again = run_shards(source, destination, {"m": model}, replace(same_format, quality=40), 10)
    assert again["counts"] == {"ok": 3, "skipped": 1, "error": 0}  # the PNG has no quality to change
    assert len((tmp_path / "out" / "a.jpg").read_bytes()) < len(before)
    rows = manifest.read_table(destination.child("manifest.parquet")).to_pylist()
    assert {row["output_uri"].rsplit("/", 1)[1]: row["output_quality"] for row in rows} == \
        {"a.jpg": 40, "x?sig=1.jpg": 40, "c.png": None, "d.jpeg": 40}
    # with skip_existing too: its rows say another quality made them
    assert run_shards(source, destination, {"m": model}, replace(same_format, skip_existing=True), 10)["counts"] == \
        {"ok": 3, "skipped": 1, "error": 0}
    assert run_shards(source, destination, {"m": model}, same_format, 10)["counts"]["skipped"] == 4


def test_rows_from_before_quality_was_recorded_count_as_done_once_then_as_made_at_that_quality(tmp_path):
    from tasks.bucket import run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {"a.jpg": jpeg("red"), "b.jpg": jpeg("green")})
    model, options = tiny_model(), ShardOptions(batch_size=4)
    run_shards(source, destination, {"m": model}, options, 10)
    [part] = (tmp_path / "out" / "_manifest_parts").glob("*.parquet")
    older = pq.read_table(part).drop_columns(["output_quality", "model_weights"])  # as an earlier version wrote it
    pq.write_table(older, part)
    assert run_shards(source, destination, {"m": model}, options, 10)["counts"]["skipped"] == 2
    rows = manifest.read_table(destination.child("manifest.parquet")).to_pylist()
    assert {(row["output_quality"], row["model_weights"] is not None) for row in rows} == {(90, True)}
    assert run_shards(source, destination, {"m": model}, replace(options, quality=50), 10)["counts"]["ok"] == 2


def test_a_rerun_stopped_part_way_through_a_finished_shard_keeps_what_it_did(tmp_path):
    # the shard has its part from the first run; the second (a retrained model) is stopped after a few images:
    # those outputs now hold the new model's pictures, and its journal says so
    from tasks.bucket import journal_location, run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {f"img{index}.jpg": jpeg((index * 40, 90, 200)) for index in range(6)})
    old, new, options = tiny_model(seed=0), tiny_model(seed=1), ShardOptions(batch_size=2)
    [shard] = list_shards(source, 10)
    run_shards(source, destination, {"m": old}, options, 10)
    seen = []

    def stop_after_three(count):
        seen.append(count)
        if sum(seen) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_shards(source, destination, {"m": new}, options, 10, on_progress=stop_after_three)
    redone = [row["input_uri"] for table in manifest.read_folder(journal_location(destination, shard.shard_id))
              for row in table.to_pylist()]
    assert 1 <= len(redone) < 6

    again = run_shards(source, destination, {"m": new}, options, 10)  # only what the stopped run did not do
    assert again["counts"] == {"ok": 6 - len(redone), "skipped": len(redone), "error": 0}
    back = run_shards(source, destination, {"m": old}, options, 10)  # every output is the new model's now
    assert back["counts"] == {"ok": 6, "skipped": 0, "error": 0}


def test_skip_existing_counts_outputs_without_rows_as_done_but_not_empty_files_another_models_or_folders(tmp_path):
    from tasks.bucket import run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {f"img{index}.jpg": jpeg((index * 40, 90, 200)) for index in range(4)})
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    skipping = ShardOptions(batch_size=4, skip_existing=True)
    fill(destination, {"img0.jpg": b"made elsewhere", "img2.jpg": b""})  # an empty file: a writer that failed
    (tmp_path / "out" / "img1.jpg").mkdir()  # a folder where an output goes is not an output
    first = run_shards(source, destination, {"m": old}, skipping, 10)
    assert first["counts"] == {"ok": 2, "skipped": 1, "error": 1}
    assert (tmp_path / "out" / "img0.jpg").read_bytes() == b"made elsewhere"
    assert (tmp_path / "out" / "img2.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG now
    (tmp_path / "out" / "img1.jpg").rmdir()
    # a retrained model: the rows say the old weights made these outputs, so even with the flag they are redone,
    # and the one counted done before now counts as the old model's too
    retrained = run_shards(source, destination, {"m": new}, skipping, 10)
    assert retrained["counts"] == {"ok": 4, "skipped": 0, "error": 0}
    assert run_shards(source, destination, {"m": new}, ShardOptions(batch_size=4), 10)["counts"]["skipped"] == 4
    # another model's outputs in the same places (one model a run, so no per-model folders): its rows say so
    other = run_shards(source, destination, {"other": old}, skipping, 10)
    assert other["counts"] == {"ok": 4, "skipped": 0, "error": 0}


def test_names_that_look_like_query_parameters_stay_distinct_in_the_manifest(tmp_path):
    from tasks.bucket import run_shards

    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    names = ["cam;key=front.jpg", "cam;key=back.jpg", "shot&session=1.jpg", "shot&session=2.jpg"]
    fill(source, {name: jpeg("red") for name in names})
    run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=4), 10)
    rows = manifest.read_table(destination.child("manifest.parquet")).to_pylist()
    assert sorted(row["input_uri"].rsplit("/", 1)[1] for row in rows) == sorted(names)
    assert sorted(row["output_uri"].rsplit("/", 1)[1] for row in rows) == sorted(names)


def test_an_output_written_over_by_a_run_from_another_source_is_done_again(tmp_path):
    # both sources hold img0.jpg: the second run writes over the first's output, whose row then no longer holds
    from tasks.bucket import run_shards

    first, second = Location(str(tmp_path / "a")), Location(str(tmp_path / "b"))
    destination = Location(str(tmp_path / "out"))
    fill(first, {"img0.jpg": jpeg("red", (20, 14))})
    fill(second, {"img0.jpg": jpeg("green", (40, 30)), "img1.jpg": jpeg("blue")})
    options = ShardOptions(batch_size=2)
    run_shards(first, destination, {"m": tiny_model()}, options, 10)
    run_shards(second, destination, {"m": tiny_model()}, options, 10)
    again = run_shards(first, destination, {"m": tiny_model()}, options, 10)
    assert again["counts"] == {"ok": 1, "skipped": 0, "error": 0}
    with Image.open(tmp_path / "out" / "img0.jpg") as output:
        assert output.size == (20, 14)
    assert run_shards(first, destination, {"m": tiny_model()}, options, 10)["counts"]["skipped"] == 1


def test_a_shard_larger_than_the_read_ahead_window_loses_no_image(tmp_path):
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {f"img{i:03}.jpg": jpeg((i * 5, 0, 0), (8, 8)) for i in range(45)})
    [shard] = list_shards(source, 100)
    result = stylize_shard(shard, source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2))
    assert result.counts["ok"] == 45
    assert len(read_outputs(destination)) == 45


def test_bounded_map_keeps_order_and_every_item():
    from concurrent.futures import ThreadPoolExecutor

    from tasks.bucket import BoundedMap

    with ThreadPoolExecutor(3) as pool:
        assert list(BoundedMap(pool, lambda x: x * x, list(range(50)), ahead=4)) == [x * x for x in range(50)]


def test_an_interrupted_shard_keeps_a_record_of_every_output_it_wrote(tmp_path):
    source, destination = Location(str(tmp_path / "in")), Location(str(tmp_path / "out"))
    fill(source, {f"img{index:02}.jpg": jpeg((index * 12, 90, 200)) for index in range(20)})
    [shard] = list_shards(source, 20)
    options = ShardOptions(batch_size=2, journal_seconds=3600)  # no periodic journal entry before the interrupt
    seen: list[int] = []

    def press_ctrl_c(count: int) -> None:
        seen.append(count)
        if sum(seen) >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stylize_shard(shard, source, destination, {"m": tiny_model()}, options, press_ctrl_c)
    written = read_outputs(destination)
    assert 0 < len(written) < 20
    again = stylize_shard(shard, source, destination, {"m": tiny_model()}, options)
    assert again.counts == {"ok": 20 - len(written), "skipped": len(written), "error": 0}
    assert again.redone == 20 - len(written)  # nothing written before the interrupt is done twice


def test_a_subfolder_that_cannot_be_read_fails_the_listing_instead_of_its_images_going_missing(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "in" / "locked").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg("red"))
    (tmp_path / "in" / "locked" / "b.jpg").write_bytes(jpeg("blue"))
    os.chmod(tmp_path / "in" / "locked", 0)
    script = ("from tasks.storage import Location, StorageError, list_files\n"
              f"try: print(list_files(Location({str(tmp_path / 'in')!r})))\n"
              "except StorageError as error: print('refused:', error)")
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:  # root reads any folder: take that power away, as for any other user
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent.parent)})
    finally:
        os.chmod(tmp_path / "in" / "locked", 0o755)
    assert result.stdout.startswith("refused: cannot list") and "Permission denied" in result.stdout, result


def test_model_metadata_that_is_not_a_json_object_is_a_checkpoint_error(tmp_path):
    from stylecore.checkpoint import CheckpointError
    from tasks.models import read_model_metadata

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="is not a JSON object"):
        read_model_metadata(Location(str(tmp_path / "odd")))


def test_the_device_of_a_worker_process_can_be_set_in_its_environment(monkeypatch):
    from tasks.models import default_device

    monkeypatch.setenv("STYLIZE_DEVICE", "cuda")  # what `stylize run --device cuda` passes to the flows' tasks
    assert default_device() == "cuda"
    monkeypatch.setenv("STYLIZE_DEVICE", "CPU")
    assert default_device() == "cpu"
    monkeypatch.setenv("STYLIZE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="must be cpu, cuda or auto"):
        default_device()


def test_a_limit_takes_the_first_image_files_as_training_counts_them(tmp_path):
    source = tmp_path / "in"
    (source / "a.jpg").mkdir(parents=True)  # a folder named like an image: listed (an error row), not a photo
    for name in ("a.jpg/z.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8)).save(source / name)
    [shard] = list_shards(Location(str(source)), 10, limit=2)
    assert shard.keys == ("a.jpg/z.jpg", "b.jpg")  # it took the folder and a.jpg/z.jpg
