"""The CLI on URLs runs the Prefect flows: a GCS bucket in and out, a summary, and a non-zero exit naming the
retry when shards fail."""

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
import torch
from PIL import Image

from stylecore.checkpoint import save_model
from stylecore.model import UNet, UNetConfig
from stylize.cli import main
from tasks import manifest
from tasks.lease import LEASE_NAME
from tasks.storage import Location, missing_bucket, write_bytes
from tests.test_cli import TINY
from tests.test_lease import lease_of
from tests.test_stylize_bucket_flow import FlakyStore

pytestmark = pytest.mark.usefixtures("prefect_harness")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def gcs_bucket(gcs_emulator, photo_dir, style_image):
    root = Location(f"gs://photos/{uuid.uuid4().hex[:8]}", gcs_emulator)
    fs, path = root.filesystem()
    for photo in sorted(photo_dir.rglob("*.jpg")):
        fs.pipe_file(f"{path}/in/{photo.relative_to(photo_dir).as_posix()}", photo.read_bytes())
    fs.pipe_file(f"{path}/in/broken.jpg", b"not an image")
    fs.pipe_file(f"{path}/style.jpg", style_image.read_bytes())
    options = [arg for key, value in gcs_emulator.items() for arg in ("--storage-option", f"{key}={value}")]
    return root, options


def test_train_and_run_on_a_gcs_bucket(home, gcs_bucket, capsys):
    root, options = gcs_bucket
    assert main(["train", root.child("style.jpg").url, "--photos", root.child("in").url, "--name", "g",
                 *options, *TINY]) == 0
    assert (home / "models" / "g" / "model.json").is_file()
    capsys.readouterr()
    again = ["train", root.child("style.jpg").url, "--photos", root.child("in").url, "--name", "g", *options, *TINY]
    assert main(again) == 2
    assert "model 'g' already exists" in capsys.readouterr().err
    assert main([*again, "--force", "--seed", "3"]) == 2  # the flows have no seed: refused, not ignored
    assert "--seed works only with local folders" in capsys.readouterr().err

    assert main(["run", root.child("in").url, root.child("out").url, "--model", "g", "--shard-size", "2",
                 *options, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "5 written, 0 already done, 1 not stylised" in captured.out and "manifest: gs://" in captured.out
    assert f"stylize: warning: not stylised: {root.child('in/broken.jpg').url}: not a recognised" in captured.err
    table = manifest.read_table(root.child("out/manifest.parquet"))
    assert table.num_rows == 6

    assert main(["run", root.child("in").url, root.child("out").url, "--model", "g", "--shard-size", "2",
                 *options, "--quiet"]) == 0
    assert "0 written, 5 already done" in capsys.readouterr().out

    # --skip-existing on URLs too: an output already in a new destination is left alone
    first_output = next(uri for uri in table.column("output_uri").to_pylist() if uri)
    made_elsewhere = root.child("out2/" + first_output.rsplit("/out/", 1)[1])
    write_bytes(made_elsewhere, b"made elsewhere")
    assert main(["run", root.child("in").url, root.child("out2").url, "--model", "g", "--skip-existing",
                 *options, "--quiet"]) == 0
    assert "4 written, 1 already done" in capsys.readouterr().out
    fs, path = made_elsewhere.filesystem()
    assert fs.cat_file(path) == b"made elsewhere"


def test_mistakes_in_trainings_and_runs_on_urls_are_one_line_before_prefect_starts(home, gcs_bucket, tmp_path, capsys):
    root, options = gcs_bucket
    style, photos = root.child("style.jpg").url, root.child("in").url
    (tmp_path / "a-file.jpg").write_bytes(b"not a folder")
    save_model(tmp_path / "store" / "models" / "taken", UNet(UNetConfig(base_channels=4, depth=2)).eval(),
               {"name": "taken"})
    empty = root.child("empty")
    write_bytes(empty.child("notes.txt"), b"no images here")
    broken = root.child("broken")
    write_bytes(broken.child("a.jpg"), b"not an image")
    write_bytes(broken.child("b.png"), b"\x89PNG\r\n\x1a\n cut short")
    store = ["--model-store", str(tmp_path / "store")]
    missing = f"no-bucket-{uuid.uuid4().hex[:8]}"
    for command, expected in [
        (["train", style, "--photos", photos, "--name", "a b/c", *store], "invalid model name 'a b/c'"),
        (["train", style, "--photos", photos, "--name", "taken", *store], "model 'taken' already exists in"),
        (["train", style, "--photos", photos, "--name", "new", "--model-store", str(tmp_path / "a-file.jpg")],
         "the model store"),  # found out after a priming, it was a storage failure to "retry"
        (["train", style, "--photos", empty.url, "--name", "new", *store], f"no images under {empty.url}"),
        (["prime", empty.url, *store], f"no images under {empty.url}"),  # it was a 137-line traceback, exit 1
        # it was the flow's failure, logged with Prefect's traceback before the one line
        (["prime", broken.url, *store], f"no readable images under {broken.url}: none of its 2 image files decodes"),
        (["train", style, "--photos", broken.url, "--name", "new", *store], "none of its 2 image files decodes"),
        # found out only when the priming was written: a storage failure to "retry", which never mended it
        (["prime", photos, "--model-store", f"gs://{missing}/store"], f"in bucket '{missing}', which does not exist"),
        (["train", style, "--photos", photos, "--name", "new", "--model-store", f"gs://{missing}/store"],
         f"in bucket '{missing}', which does not exist"),
        (["run", photos, f"gs://{missing}/out", "--model", str(tmp_path / "store" / "models" / "taken")],
         f"the destination gs://{missing}/out lies in bucket '{missing}', which does not exist"),
    ]:
        tiny = {"train": TINY, "prime": ["--steps", "3", "--image-size", "32", "--quiet"]}.get(command[0], ["--quiet"])
        assert main([*command, *options, *tiny]) == 2, command
        captured = capsys.readouterr()
        [line] = captured.err.strip().splitlines()
        assert line.startswith("stylize: error: ") and expected in line, line
    assert not (tmp_path / "store" / "models" / "new").exists()


def test_a_bucket_another_run_is_writing_to_is_left_alone_with_exit_75(home, gcs_bucket, photo_dir, style_image,
                                                                        capfd):
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "m", *TINY]) == 0
    capfd.readouterr()
    root, options = gcs_bucket
    write_bytes(root.child(f"out/{LEASE_NAME}"), lease_of("nightly-run", "other-host", 4242, 20))
    code = main(["run", root.child("in").url, root.child("out").url, "--model", "m", *options, "--quiet"])
    [error] = capfd.readouterr().err.strip().splitlines()  # one line: no failed flow run's traceback before it
    assert code == 75
    assert error.startswith("stylize: error: another run is writing to gs://") and "nightly-run on other-host" in error
    fs, path = root.child("out").filesystem()
    assert [name.rsplit("/", 1)[-1] for name in fs.find(path)] == ["lease.json"]  # nothing else written


def test_a_model_store_runs_folders_through_the_flow_keeping_each_inputs_format(home, photo_dir, tmp_path, capsys):
    store = tmp_path / "store"
    torch.manual_seed(0)
    save_model(store / "models" / "m", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "m"})
    Image.new("RGB", (20, 16), "teal").save(photo_dir / "flat.png")
    destination = tmp_path / "out"
    assert main(["run", str(photo_dir), str(destination), "--model", "m", "--model-store", store.as_uri(),
                 "--format", "same", "--device", "cpu", "--quiet"]) == 0
    assert "6 written, 0 already done" in capsys.readouterr().out  # the flow's summary: the store's model
    written = sorted(p.relative_to(destination) for p in destination.rglob("*.*") if "_manifest" not in str(p))
    assert sorted(p.relative_to(photo_dir) for p in photo_dir.rglob("*.*")) == [
        p for p in written if p.name != "manifest.parquet"]
    assert "STYLIZE_DEVICE" not in os.environ  # --device was for this run's flow only


def test_prime_with_a_model_store_folder_primes_through_the_flow_into_it(home, photo_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["prime", str(photo_dir), "--model-store", str(store), "--steps", "2", "--image-size", "32",
                 "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"primed checkpoint: {store}/primed/")
    assert len(list(store.glob("primed/*/model.json"))) == 1 and not (home / "primed").exists()


def test_train_on_urls_refuses_unusable_vgg_weights_before_any_priming(home, gcs_bucket, tmp_path, capsys):
    root, options = gcs_bucket
    empty = tmp_path / "vgg.pth"
    empty.write_bytes(b"")
    assert main(["train", root.child("style.jpg").url, "--photos", root.child("in").url, "--name", "v",
                 "--vgg-weights", str(empty), *options, *TINY]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the emulator's own request log may come before it
    assert last.startswith("stylize: error: cannot read VGG weights") and "the file is empty" in last
    assert not (home / "primed").exists()


def test_failed_shards_exit_non_zero_and_name_the_retry(home, photo_dir, style_image, tmp_path, capsys):
    assert main(["train", str(style_image), "--photos", str(photo_dir), "--name", "m", *TINY]) == 0
    fsspec.register_implementation("flaky", FlakyStore, clobber=True)
    destination = f"flaky://{uuid.uuid4().hex[:8]}/out"
    FlakyStore.broken_marker = "/out/sub/"
    try:
        code = main(["run", str(photo_dir), destination, "--model", "m", "--shard-size", "2", "--retries", "0",
                     "--quiet"])
    finally:
        FlakyStore.broken_marker = None
    captured = capsys.readouterr()
    assert code == 1
    assert "shards failed" in captured.err and "run the same command again" in captured.err
    assert main(["run", str(photo_dir), destination, "--model", "m", "--shard-size", "2", "--quiet"]) == 0
    assert "already done" in capsys.readouterr().out


@pytest.mark.parametrize("make_args,message", [
    (lambda t: ["run", "foo://x/in", f"file://{t}/out", "--model", "m"], "Protocol not known"),
    (lambda t: ["run", f"file://{t}/nope", f"file://{t}/out", "--model", "m"], "source not found"),
    (lambda t: ["run", f"memory://nothing-{t.name}", "memory://out", "--model", "m"], "source not found"),
    (lambda t: ["run", f"file://{t}/in", f"file://{t}/out", "--model", "nosuch"], "no model at"),
    (lambda t: ["run", f"file://{t}/in", f"file://{t}", "--model", "m"], "lies inside the destination"),
    (lambda t: ["prime", f"file://{t}/nope"], "photo folder not found"),
    (lambda t: ["train", f"file://{t}/nostyle.jpg", "--photos", f"file://{t}/in", "--name", "x"], "style image not found"),
    (lambda t: ["train", f"file://{t}/in/notes.jpg", "--photos", f"file://{t}/in", "--name", "x"], "cannot read style image"),
    (lambda t: ["run", f"file://{t}/in/notes.jpg", f"file://{t}/out", "--model", "m"], "source file://"),
    (lambda t: ["run", f"file://{t}/in", f"file://{t}/in/notes.jpg", "--model", "m"], "is a file, not a folder"),
    (lambda t: ["train", f"file://{t}/in/notes.jpg", "--photos", f"file://{t}/in/notes.jpg", "--name", "x"],
     "the photo folder file://"),
    (lambda t: ["run", f"file://{t}/in", f"file://{t}/out", "--model", str(t / "in" / "notes.jpg")],
     "notes.jpg is a file: runs on URLs take a model by name or by its folder"),
    (lambda t: ["run", f"file://{t}/in", f"file://{t}/out", "--model", f"file://{t}/in/notes.jpg"],
     "not a model's folder"),
])
def test_mistakes_in_urls_are_one_line_before_any_flow_starts(make_args, message, home, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.jpg").write_text("just text")
    Image.new("RGB", (32, 32), "teal").save(tmp_path / "in" / "photo.jpg")  # photos a training could use
    assert main([*make_args(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stylize: error: ") and message in err[0], err


class RefusingCredentials(BaseHTTPRequestHandler):
    """Answers every request as GCS answers a caller whose credentials it refuses: 401, which gcsfs does not retry
    (it logs a traceback and raises its own HttpError, neither an OSError nor a StorageError)."""

    def do_GET(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # an upload's body, before answering
        body = json.dumps({"error": {"code": 401, "message": "Login Required"}}).encode()
        try:
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the client gave up first
            pass

    do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def refusing_store():
    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingCredentials)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ["--storage-option", f"endpoint_url=http://127.0.0.1:{server.server_address[1]}",
           "--storage-option", "token=anon", "--storage-option", "project=test"]
    server.shutdown()


@pytest.mark.parametrize("make_args", [
    lambda t: ["run", "gs://photos/in", "gs://photos/out", "--model", str(t / "model")],
    lambda t: ["run", str(t / "in"), "gs://photos/out", "--model", str(t / "model")],
    lambda t: ["run", str(t / "in"), str(t / "out"), "--model", "gs://photos/model"],
    lambda t: ["train", "gs://photos/style.jpg", "--photos", str(t / "in"), "--name", "x"],
    lambda t: ["train", str(t / "in" / "a.jpg"), "--photos", str(t / "in"), "--name", "x",
               "--model-store", "gs://photos/store"],
    lambda t: ["prime", str(t / "in"), "--model-store", "gs://photos/store"],
])
def test_a_store_refusing_the_credentials_is_one_line_before_any_flow_starts(make_args, refusing_store, home,
                                                                              tmp_path, capfd):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32), "teal").save(tmp_path / "in" / "a.jpg")
    save_model(tmp_path / "model", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "m"})
    assert main([*make_args(tmp_path), *refusing_store, "--quiet"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stylize: error: ") and "Login Required, 401" in err[0], err


def test_a_quiet_run_whose_shards_still_fail_prints_its_summary_and_one_error_line(photo_dir, tmp_path):
    # A fresh `stylize` process (Prefect's console settings apply only before Prefect is imported), writing into an
    # in-memory store whose writes under out/sub/ fail.
    save_model(tmp_path / "model", UNet(UNetConfig(base_channels=4, depth=2)).eval(), {"name": "m"})
    (photo_dir / "sub").mkdir(exist_ok=True)
    for index in range(2):
        Image.new("RGB", (32, 32), "teal").save(photo_dir / "sub" / f"{index}.jpg")
    driver = (
        "import sys, fsspec\n"
        "from fsspec.implementations.memory import MemoryFileSystem\n"
        "class Broken(MemoryFileSystem):\n"
        "    protocol = 'broken'\n"
        "    def pipe_file(self, path, value, **kwargs):\n"
        "        if '/out/sub/' in path: raise OSError(f'simulated outage writing {path}')\n"
        "        return super().pipe_file(path, value, **kwargs)\n"
        "fsspec.register_implementation('broken', Broken, clobber=True)\n"
        "from stylize.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's server: none to start
           "STYLIZE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", driver, "run", str(photo_dir), "broken://x/out", "--model",
                           str(tmp_path / "model"), "--shard-size", "2", "--retries", "0", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    [summary] = done.stdout.strip().splitlines()  # what the other shards made: it printed nothing
    assert " written, 0 already done" in summary and "(7 images, 4 shards" in summary, summary
    [error] = done.stderr.strip().splitlines()  # it was 32 lines, two of Prefect's tracebacks among them
    assert " of 4 shards failed" in error and "simulated outage writing broken://x/out/sub/" in error, error
    assert error.count("run the") == 1 and error.endswith("(only missing and failed images are redone)"), error


class EmptyBucketWithoutBucketRead(BaseHTTPRequestHandler):
    """An empty bucket as GCS shows it to a key that may read and write objects but not read the bucket itself
    (roles/storage.objectAdmin): 403 for the bucket, an empty listing of its objects."""

    def do_GET(self):
        path = self.path.split("?")[0]
        if re.fullmatch(r"/storage/v1/b/[^/]+", path):
            code, body = 403, {"error": {"code": 403, "message": "no storage.buckets.get access"}}
        elif re.fullmatch(r"/storage/v1/b/[^/]+/o", path):
            code, body = 200, {"kind": "storage#objects"}
        else:
            code, body = 404, {"error": {"code": 404, "message": "Not Found"}}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_only_a_bucket_that_does_not_exist_is_refused_as_missing(gcs_emulator):
    server = ThreadingHTTPServer(("127.0.0.1", 0), EmptyBucketWithoutBucketRead)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{server.server_address[1]}", "token": "anon", "project": "p"}
        assert missing_bucket(Location("gs://fresh-and-empty/out", options)) is None  # it was called missing
    finally:
        server.shutdown()
    missing = f"no-bucket-{uuid.uuid4().hex[:8]}"
    assert missing_bucket(Location(f"gs://{missing}/out", gcs_emulator)) == missing
    assert missing_bucket(Location("gs://photos/anything", gcs_emulator)) is None
