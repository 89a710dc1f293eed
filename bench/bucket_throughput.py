"""End-to-end bucket stylisation against the model alone, with and without Prefect, on local disk or a GCS
emulator, with peak RSS per run (each run in its own process).

    .venv/bin/python bench/bucket_throughput.py --images 1000 --size 128          # the matrix below
    .venv/bin/python bench/bucket_throughput.py --images 1000 --size 128 --only flow-local
    .venv/bin/python bench/bucket_throughput.py --images 10000 --size 64 --runs model,loop-local --workers 2
    python3 bench/bucket_throughput.py --images 10000 --size 512 --batch 0 --workers 4 \
        --runs loop-local,flow-local,loop-local,flow-local                   # on a GPU: Prefect's share, alternated

Runs: model (forward only, batch of decoded tensors), loop-local (run_shards, what `stylize run` does on local
folders: no Prefect, in --workers processes), flow-local and flow-gcs (the stylize-bucket flow: the flow run's
whole wall time, once Prefect's server is up), all on the GPU when there is one. A kind named twice runs twice,
each into its own destination; the table lists every run, and Prefect's overhead compares the kinds' means.
Prints a table and one JSON line per run, with the CPU seconds of the run's process, its shard workers and its
Prefect server: wall-time differences between runs drift with the machine, CPU seconds far less, so Prefect's own
cost (the flow process's CPU beyond the loop's, plus its server's) is reported as a share of the loop's CPU too.
Input photos: ../shared/data/photos when present, else the bundled ones, centre-cropped to SIZE and
re-encoded as JPEG. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from arguments import non_negative_int, positive_int  # noqa: E402 (bench/, the script's own folder)
RUNS = ("model", "loop-local", "flow-local", "flow-gcs")


def make_images(folder: Path, count: int, size: int) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from engine_throughput import make_images as write_crops

    shared = REPO.parent / "shared" / "data" / "photos" / "train"
    write_crops(folder, shared if any(shared.glob("*.jpg")) else REPO / "stylecore" / "assets" / "photos", count, size)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def server_cpu_seconds() -> float | None:
    """CPU time of this process's Prefect server subprocess (the ephemeral one), from /proc; None when there is
    none (a server elsewhere, PREFECT_API_URL) or no /proc."""
    total, found = 0.0, False
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and b"uvicorn" in (entry / "cmdline").read_bytes():
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                found = True
        except (OSError, IndexError, ValueError):
            continue
    return total if found else None


def cpu_marks() -> tuple[float, float, float | None]:
    """CPU seconds so far: this process, its finished children (the shard workers), its Prefect server (None: none)."""
    return cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN), server_cpu_seconds()


def cpu_record(start: tuple[float, float, float | None]) -> dict:
    """CPU seconds since ``start`` (``cpu_marks()``). Unlike wall time these hardly move with what else the machine
    is doing, so Prefect's own cost shows in them."""
    (self_start, children_start, server_start), (self_now, children_now, server_now) = start, cpu_marks()
    server = server_now - server_start if server_now is not None and server_start is not None else None
    return {"cpu_self_s": round(self_now - self_start, 2), "cpu_workers_s": round(children_now - children_start, 2),
            "cpu_server_s": round(server, 2) if server is not None else None}


def run_one(kind: str, images: Path, work: Path, batch: int, shard_size: int, workers: int = 1,
            compile: bool = False, gpu_decode: bool = False, index: int = 0) -> dict:
    import torch

    from stylecore.model import UNet, UNetConfig
    from tasks.models import save_model_to
    from tasks.storage import Location

    torch.manual_seed(0)
    store = Location(str(work / "store"))
    if not (work / "store" / "models" / "bench" / "model.json").exists():
        save_model_to(store.child("models/bench"), UNet(UNetConfig()).eval(), {"name": "bench"})
    count = sum(1 for _ in images.rglob("*.jpg"))
    started = time.perf_counter()

    if kind == "model":  # the engine's forward: same device, memory format, compilation and batch
        from stylecore.images import decode_image, image_to_tensor
        from stylecore.stylize import stylize_batch
        from tasks.models import load_model_from

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = load_model_from(store.child("models/bench"), str(device))
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        if compile:
            model = torch.compile(model)
        size = batch or (64 if device.type == "cuda" else 8)
        paths = sorted(images.rglob("*.jpg"))
        sample = [image_to_tensor(decode_image(paths[i % len(paths)].read_bytes())) for i in range(size)]
        batch_tensor = torch.stack(sample).to(device).contiguous(memory_format=memory_format)

        def forward() -> None:
            stylize_batch(model, batch_tensor)
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(3 if compile else 1):  # warm-up (and compilation)
            forward()
        started = time.perf_counter()
        done = 0
        while done < count:
            forward()
            done += size
        seconds = time.perf_counter() - started
        return {"run": kind, "images": count, "seconds": round(seconds, 2), "img_per_s": round(done / seconds, 2),
                "peak_rss_mb": round(peak_rss_mb(), 1)}

    if kind == "loop-local":
        from tasks.bucket import ShardOptions, run_shards
        from tasks.models import load_model_from

        started = time.perf_counter()  # imports done, as the flow's are: from loading the model on, as it does
        cpu_start = cpu_marks()
        model, _ = load_model_from(store.child("models/bench"))
        source, destination = Location(str(images)), Location(str(work / f"out-loop-{index}"))
        options = ShardOptions(batch_size=batch, workers=workers, compile=compile, gpu_decode=gpu_decode)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # where the flow runs too
        summary = run_shards(source, destination, {"bench": model}, options, shard_size, device=device)
        assert summary["counts"]["ok"] == count, summary
    else:
        from prefect import flow

        from flows.stylize_bucket import stylize_bucket

        flow(name="bench-warm-up")(lambda: None)()  # starts Prefect's ephemeral server, as a running one would be
        started = time.perf_counter()
        cpu_start = cpu_marks()
        options = {}
        source, destination = str(images), str(work / f"out-flow-{index}")
        server = None
        if kind == "flow-gcs":
            import socket

            from gcp_storage_emulator.server import create_server

            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bench")
            server.start()
            options = {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "bench"}
            fs, _ = Location("gs://bench/in", options).filesystem()
            for path in sorted(images.rglob("*.jpg")):
                fs.pipe_file(f"bench/in/{path.relative_to(images).as_posix()}", path.read_bytes())
            source, destination = "gs://bench/in", f"gs://bench/out-{index}"
            started = time.perf_counter()
            cpu_start = cpu_marks()
        summary = stylize_bucket(source, destination, ["bench"], model_store=store.url, storage_options=options,
                                 shard_size=shard_size, batch_size=batch, workers=workers, compile=compile,
                                 gpu_decode=gpu_decode)
        if server is not None:
            server.stop()
        assert summary["counts"]["ok"] == count, summary
        # The flow run's whole wall time, Prefect's own work for it included (creating and finishing the run, its
        # task runs, artifacts); the one-off ephemeral server start (7-16 s a process) is left out, as it is when
        # a server is running.
        seconds = time.perf_counter() - started
        cpu = cpu_record(cpu_start)  # the GCS emulator's threads (flow-gcs) count as this process's
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return {"run": kind, "images": count, "seconds": round(seconds, 2), "img_per_s": round(count / seconds, 2),
                "flow_body_seconds": summary["seconds"], **cpu, "peak_rss_mb": round(peak_rss_mb(), 1),
                "workers": summary["workers"],
                "worker_peak_rss_mb": round(children, 1) if summary["workers"] > 1 else None}
    seconds = time.perf_counter() - started
    cpu = cpu_record(cpu_start)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"run": kind, "images": count, "seconds": round(seconds, 2), "img_per_s": round(count / seconds, 2),
            **cpu, "peak_rss_mb": round(peak_rss_mb(), 1), "workers": workers,
            "worker_peak_rss_mb": round(children, 1) if workers > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=1000)
    parser.add_argument("--size", type=positive_int, default=128)
    parser.add_argument("--batch", type=non_negative_int, default=8, help="0: the engine's choice")
    parser.add_argument("--shard-size", type=positive_int, default=256)
    parser.add_argument("--workers", type=positive_int, default=1, help="shard worker processes of loop-local and the flows (default 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (each worker its own)")
    parser.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=True,
                        help="decode JPEG inputs on the GPU (the default there; --no-gpu-decode: in CPU threads)")
    parser.add_argument("--only", choices=RUNS, help="run just this one")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--work", type=Path, help="(internal) working folder holding images/")
    parser.add_argument("--index", type=int, default=0, help="(internal) which run of its kind this is")
    args = parser.parse_args()

    if args.only and args.work:
        print(json.dumps(run_one(args.only, args.work / "images", args.work, args.batch, args.shard_size,
                                 args.workers, args.compile, args.gpu_decode, args.index)))
        return

    with tempfile.TemporaryDirectory(prefix="stylize-bench-") as folder:
        work = Path(folder)
        make_images(work / "images", args.images, args.size)
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect"),  # keeps carried wheels on the path
               "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        results = []
        for index, kind in enumerate([args.only] if args.only else args.runs.split(",")):
            if kind not in RUNS:
                sys.exit(f"unknown run {kind!r}: choose from {', '.join(RUNS)}")
            command = [sys.executable, __file__, "--only", kind, "--work", str(work), "--images", str(args.images),
                       "--size", str(args.size), "--batch", str(args.batch), "--shard-size", str(args.shard_size),
                       "--workers", str(args.workers), "--index", str(index)]
            command += ["--compile"] * args.compile + ["--no-gpu-decode"] * (not args.gpu_decode)
            process = subprocess.run(command, capture_output=True, text=True, env=env)
            if process.returncode != 0:
                sys.exit(f"{kind} failed:\n{process.stderr[-3000:]}")
            results.append(json.loads(process.stdout.strip().splitlines()[-1]))
            print(json.dumps({"bench": "bucket_throughput", **results[-1], "size": args.size, "batch": args.batch,
                              "compile": args.compile, "gpu_decode": args.gpu_decode}), flush=True)
    def mean(kind: str, key: str) -> float | None:
        values = [r[key] for r in results if r["run"] == kind and r.get(key) is not None]
        return sum(values) / len(values) if values else None  # None: no such run, or none measured it

    model, loop, flow = mean("model", "img_per_s"), mean("loop-local", "seconds"), mean("flow-local", "seconds")
    print(f"\n{args.images} images at {args.size}px, batch {args.batch}, shards of {args.shard_size}, "
          f"{args.workers} worker(s){', compiled' if args.compile else ''}{'' if args.gpu_decode else ', CPU decode'}")
    print(f"{'run':12}{'img/s':>9}{'x model':>9}{'seconds':>9}{'peak RSS MB':>13}  CPU s: {'self':>7}{'workers':>9}"
          f"{'server':>8}")
    for r in results:
        ratio = f"{r['img_per_s'] / model:.2f}" if model else "-"
        cpu = "".join(f"{r[key]:>{width}.1f}" if r.get(key) is not None else f"{'-':>{width}}"
                      for key, width in (("cpu_self_s", 7), ("cpu_workers_s", 9), ("cpu_server_s", 8)))
        print(f"{r['run']:12}{r['img_per_s']:>9.1f}{ratio:>9}{r['seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}         {cpu}")
    if loop and flow:
        pairs = sum(r["run"] == "flow-local" for r in results)
        # Prefect's own CPU: the flow process's beyond the loop's parent (which does the same listing, workers and
        # manifest without Prefect), plus its server's; as a share of all the CPU the loop's run used.
        server = mean("flow-local", "cpu_server_s")  # None: a server elsewhere (PREFECT_API_URL), not counted
        prefect_cpu = mean("flow-local", "cpu_self_s") + (server or 0.0) - mean("loop-local", "cpu_self_s")
        loop_cpu = mean("loop-local", "cpu_self_s") + mean("loop-local", "cpu_workers_s")
        print(f"Prefect overhead (flow-local vs loop-local, mean seconds of {pairs} run(s) each): "
              f"{100 * (flow - loop) / loop:+.1f}% of the wall time; Prefect's CPU (flow process beyond the loop's"
              f"{', and its server' if server is not None else '; its server runs elsewhere, not counted'}) "
              f"{prefect_cpu:.1f} s, {100 * prefect_cpu / loop_cpu:.1f}% of the loop's {loop_cpu:.1f} s")
        print(json.dumps({"bench": "bucket_throughput", "summary": "prefect_overhead", "images": args.images,
                          "size": args.size, "loop_seconds": round(loop, 2), "flow_seconds": round(flow, 2),
                          "overhead_percent": round(100 * (flow - loop) / loop, 1),
                          "prefect_cpu_seconds": round(prefect_cpu, 2), "loop_cpu_seconds": round(loop_cpu, 2),
                          "prefect_cpu_percent": round(100 * prefect_cpu / loop_cpu, 1)}), flush=True)


if __name__ == "__main__":
    main()
