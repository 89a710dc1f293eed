"""End to end on a real Prefect server: `prefect server start` on a free loopback port, the deployments served
by `python -m deployments.serve`, and each deployment triggered with run_deployment: train-style, stylize-bucket,
a bucket run that fails on one shard healed by retry-failed and, separately, by retrying the flow run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled

from tasks import manifest
from tasks.bucket import journal_location, list_shards
from tasks.storage import Location

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def group_rss_mb(group: int) -> float:
    """Resident memory of every process in a process group (Linux /proc)."""
    total_kb = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # the process group id
                status = (stat.parent / "status").read_text()
                total_kb += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    return total_kb / 1024


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory, vgg_weights):
    """A real Prefect server and a serve() process with the deployments; both stopped by their own ids."""
    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "STYLIZE_HOME": str(root / "stylize-home"), "STYLIZE_VGG_WEIGHTS": str(vgg_weights),
           "TORCH_HOME": str(root / "torch-home"), "PYTHONPATH": str(REPO)}
    logs = root / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=root, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    worker = None
    try:
        wait_for(lambda: healthy(api), 120, "the Prefect server")
        worker = subprocess.Popen([sys.executable, "-m", "deployments.serve"], env=env, cwd=REPO,
                                  stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        with temporary_settings({PREFECT_API_URL: api}):
            def registered():
                with get_client(sync_client=True) as client:
                    return len(client.read_deployments()) >= 3
            wait_for(registered, 120, "the served deployments")
            yield {"root": root, "api": api, "ui": f"http://127.0.0.1:{port}", "logs": logs}
            print(f"Prefect server RSS after the tests: {group_rss_mb(server.pid):.0f} MB; "
                  f"serve process: {group_rss_mb(worker.pid):.0f} MB")
    finally:
        if worker is not None:
            stop(worker)
        stop(server)


def photos(folder: Path, count: int) -> None:
    for index in range(count):
        path = folder / f"part{index % 3}" / f"img{index:02}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 16), (index * 25 % 255, 90, 160)).save(path, "JPEG")


def run(name: str, parameters: dict, timeout: float = 600):
    started = time.perf_counter()
    flow_run = run_deployment(name, parameters=parameters, timeout=timeout)
    return flow_run, time.perf_counter() - started


def test_each_deployment_runs_for_real_and_failed_batches_heal(served, photo_dir, style_image):
    root = served["root"]
    store = root / "stylize-home"
    with temporary_settings({PREFECT_API_URL: served["api"]}):
        # train-style, from the form's parameters
        request = {"style_image_url": str(style_image), "model_name": "e2e", "photos_url": str(photo_dir),
                   "steps": 2, "prime_steps": 2, "image_size": 32}
        flow_run, seconds = run("train-new-style/train-style", {"request": request})
        assert flow_run.state.is_completed(), flow_run.state
        assert (store / "models" / "e2e" / "model.json").is_file()
        print(f"train-style: {seconds:.1f}s from run_deployment to Completed")

        # stylize-bucket
        photos(root / "bucket", 9)
        bucket = {"source": str(root / "bucket"), "destination": str(root / "out"), "models": ["e2e"],
                  "model_store": str(store), "shard_size": 3}
        flow_run, seconds = run("stylize-bucket/stylize-bucket", {**bucket, "workers": 2})  # spawned by the runner
        assert flow_run.state.is_completed(), flow_run.state
        assert manifest.counts(manifest.read_table(Location(str(root / "out" / "manifest.parquet"))))["ok"] == 9
        print(f"stylize-bucket: {seconds:.1f}s from run_deployment to Completed")

        # A run that fails on one shard: a file stands where that shard's journal folder must go, so recording its
        # rows fails (a storage failure of the shard, as a lost connection would be).
        part1, = [shard for shard in list_shards(Location(str(root / "bucket")), 3) if shard.keys[0].startswith("part1/")]
        for destination in ("heal-by-retry-failed", "heal-by-flow-retry"):
            target = root / destination
            blocker = Path(journal_location(Location(str(target)), part1.shard_id).url)
            blocker.parent.mkdir(parents=True)
            blocker.write_text("in the way")
            failed, _ = run("stylize-bucket/stylize-bucket", {**bucket, "destination": str(target), "retries": 0})
            assert failed.state.is_failed()
            counts = manifest.counts(manifest.read_table(Location(str(target / "manifest.parquet"))))
            assert counts == {"ok": 6, "skipped": 0, "error": 0}
            blocker.unlink()

        flow_run, seconds = run("retry-failed/retry-failed", {"destination": str(root / "heal-by-retry-failed")})
        assert flow_run.state.is_completed(), flow_run.state
        healed = manifest.read_table(Location(str(root / "heal-by-retry-failed" / "manifest.parquet")))
        assert manifest.counts(healed) == {"ok": 3, "skipped": 6, "error": 0}
        print(f"retry-failed: {seconds:.1f}s from run_deployment to Completed")

        # Prefect's own retry of the failed flow run (what the UI's "Retry" does): schedule it again. It is the
        # same flow run, so the outputs its first attempt made keep their ok rows, untouched; only part1 is redone.
        first = manifest.read_table(Location(str(root / "heal-by-flow-retry" / "manifest.parquet"))).to_pylist()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(failed.id, Scheduled(), force=True)
            final = wait_for(lambda: (lambda r: r if r.state.is_final() else None)(client.read_flow_run(failed.id)),
                             300, "the retried flow run")
        assert final.state.is_completed(), final.state
        healed = manifest.read_table(Location(str(root / "heal-by-flow-retry" / "manifest.parquet")))
        assert manifest.counts(healed) == {"ok": 9, "skipped": 0, "error": 0}
        kept = {(row["input_uri"], row["finished_at"]) for row in first}
        redone = [row for row in healed.to_pylist() if (row["input_uri"], row["finished_at"]) not in kept]
        assert len(redone) == 3 and all("/part1/" in row["output_uri"] for row in redone)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-dev-shm-usage"]


def test_a_new_style_is_trained_from_the_prefect_ui_form(served, photo_dir, style_image, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed (scripts/test.sh installs it with apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    store = served["root"] / "stylize-home"
    with temporary_settings({PREFECT_API_URL: served["api"]}):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("train-new-style/train-style")
            before = {run.id for run in client.read_flow_runs()}
        started = time.perf_counter()
        with sync_playwright() as playwright:
            home = tmp_path / "browser-home"  # chromium's crash reports and caches stay in the test's folder
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
                env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
                     "XDG_CACHE_HOME": str(home / "cache")})
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{served['ui']}/deployments/deployment/{deployment.id}", wait_until="networkidle")
                page.get_by_role("button", name="Run", exact=True).click()
                page.get_by_text("Custom run", exact=True).click()
                page.wait_for_url("**/run**")
                page.wait_for_load_state("networkidle")
                page.get_by_text("Style image URL", exact=True).wait_for()

                def field(title: str, kind: str = "textarea"):
                    return page.get_by_text(title, exact=True).locator(f"xpath=following::{kind}[1]")

                field("Style image URL").fill(str(style_image))
                field("Model name").fill("from-the-ui")
                field("Photo set URL").fill(str(photo_dir))
                for title, value in [("Style steps (Optional)", "2"), ("Priming steps (Optional)", "2"),
                                     ("Crop size (Optional)", "32")]:
                    page.get_by_text(title, exact=True).locator("xpath=following::button[normalize-space()='int'][1]").click()
                    field(title, "input[@type='number']").fill(value)
                screenshot = tmp_path / "train-style-form.png"
                page.screenshot(path=str(screenshot))
                page.get_by_text("Style image URL", exact=True).scroll_into_view_if_needed()
                page.screenshot(path=str(tmp_path / "train-style-form-top.png"))
                page.get_by_role("button", name="Submit").click()
                try:  # the UI leaves the form once the run is created
                    page.wait_for_url(lambda url: not url.split("?")[0].endswith("/run"), timeout=90_000)
                except Exception:
                    page.screenshot(path=str(tmp_path / "after-submit.png"), full_page=True)
                    raise AssertionError(f"the form did not submit; screenshot {tmp_path / 'after-submit.png'}; "
                                         f"page says: {page.locator('body').inner_text()[-1500:]}") from None
                with get_client(sync_client=True) as client:
                    [new_run] = wait_for(lambda: [r for r in client.read_flow_runs() if r.id not in before], 120,
                                         "the flow run submitted from the form")
            finally:
                browser.close()
        print(f"form screenshot: {screenshot}")

        assert new_run.deployment_id == deployment.id
        with get_client(sync_client=True) as client:
            final = wait_for(lambda: (lambda r: r if r.state.is_final() else None)(client.read_flow_run(new_run.id)),
                             300, "the flow run started from the UI")
        assert final.state.is_completed(), final.state
        print(f"UI form run: {time.perf_counter() - started:.1f}s from opening the form to Completed")
        assert (store / "models" / "from-the-ui" / "model.safetensors").is_file()
        metadata = json.loads((store / "models" / "from-the-ui" / "model.json").read_text())
        assert metadata["preset"] == "fast" and metadata["steps"] == 2
        assert screenshot.stat().st_size > 10_000
