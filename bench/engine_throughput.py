"""End to end against model only, in one process, on whatever device is there (the GPU benchmark; the CPU one
with Prefect is bucket_throughput.py).

    python bench/engine_throughput.py --images 10000 --size 512 [--compile] [--no-gpu-codec | --gpu-encode-share S]
        [--no-gpu-decode] [--workers N] [--photos DIR]

Writes N JPEGs of SIZE x SIZE (crops of the photos, re-encoded) to a temporary folder, builds the shard
engine once, then times (1) model only: the engine's forward on a decoded uint8 batch already on the device
(same model object, same compile, same autocast and memory format) and (2) end to end: every shard through
tasks.bucket.run_shards from local disk to local disk with the manifest, no Prefect, in --workers processes (each
with its own engine; their start, a few seconds, is in the time; the steady rate leaves it out). Prints one JSON
line with the rates, their ratios and the peak RSS of this process and of the largest worker, then a table.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from arguments import existing_folder, fraction, non_negative_int, positive_int  # noqa: E402
from stylecore.model import UNet, UNetConfig  # noqa: E402
from tasks.bucket import ShardOptions, engine_for, run_shards  # noqa: E402
from tasks.storage import Location  # noqa: E402


def _encode_crop(args: tuple[str, int]) -> bytes:
    from PIL import Image, ImageOps

    path, size = args
    buffer = io.BytesIO()
    ImageOps.fit(Image.open(path).convert("RGB"), (size, size)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_images(folder: Path, photos: Path, count: int, size: int) -> None:
    sources = sorted(str(p) for p in photos.rglob("*.jpg"))[:200]
    if not sources:
        sys.exit(f"{Path(sys.argv[0]).name}: no .jpg photos under {photos}")
    with ProcessPoolExecutor() as pool:
        encoded = list(pool.map(_encode_crop, [(p, size) for p in sources]))
    for index in range(count):
        path = folder / f"d{index // 1000:03}" / f"img{index:06}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded[index % len(encoded)])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=1000)
    parser.add_argument("--size", type=positive_int, default=512)
    parser.add_argument("--batch", type=non_negative_int, default=0, help="0: the engine's choice")
    parser.add_argument("--shard-size", type=positive_int, default=2500)
    parser.add_argument("--base", type=positive_int, default=UNetConfig.base_channels)
    parser.add_argument("--depth", type=positive_int, default=UNetConfig.depth)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-gpu-codec", action="store_true")
    parser.add_argument("--gpu-encode-share", type=fraction, default=None,
                        help="fixed share of JPEG outputs encoded by nvjpeg (0 to 1); default: the engine's split")
    parser.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=True,
                        help="decode JPEG inputs by nvjpeg on a GPU (the default; --no-gpu-decode: in CPU threads)")
    parser.add_argument("--workers", type=positive_int, default=1, help="shard worker processes (default 1)")
    parser.add_argument("--photos", type=existing_folder, default=REPO / "stylecore" / "assets" / "photos")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for the images (kept between runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    work = args.work or Path(tempfile.mkdtemp(prefix="engine-bench-"))
    images = work / f"images-{args.images}-{args.size}"
    if not images.exists():
        began = time.perf_counter()
        make_images(images.with_suffix(".tmp"), args.photos, args.images, args.size)
        images.with_suffix(".tmp").rename(images)
        print(f"wrote {args.images} images in {time.perf_counter() - began:.1f}s", file=sys.stderr)
    destination = work / "out"
    shutil.rmtree(destination, ignore_errors=True)

    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=args.base, depth=args.depth)).eval().to(device)
    options = ShardOptions(batch_size=args.batch, compile=args.compile, gpu_codec=not args.no_gpu_codec,
                           gpu_encode_share=args.gpu_encode_share, gpu_decode=args.gpu_decode)
    engine = engine_for({"bench": model}, options)
    batch = engine.batch_size

    # Model only: a decoded batch on the device, the engine's own forward (compiled if asked).
    inputs = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    net = engine.models["bench"]
    began = time.perf_counter()
    engine.forward(net, inputs)
    synchronize(device)
    warmup_s = time.perf_counter() - began
    # The best of several timed rounds of at least a second each: one short round on a busy CPU can be off by 10x.
    rates = []
    for _ in range(3):
        repeats, began = 0, time.perf_counter()
        while repeats < 3 or time.perf_counter() - began < 1.0:
            for _ in range(3):  # queued back to back, as in a run; synchronised before the clock is read
                engine.forward(net, inputs)
            repeats += 3
            synchronize(device)
        rates.append(repeats * batch / (time.perf_counter() - began))
    model_rate = max(rates)

    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model-only batches' memory, for the workers' budgets
    finished: list[tuple[float, int]] = []  # (when, how many) as images finish
    began = time.perf_counter()
    summary = run_shards(Location(str(images)), Location(str(destination)), {"bench": model},
                         replace(options, workers=args.workers), args.shard_size,
                         on_progress=lambda count: finished.append((time.perf_counter(), count)))
    counts = summary["counts"]
    assert counts["ok"] == args.images, counts  # a rate over images that were not all stylised means nothing
    synchronize(device)
    seconds = time.perf_counter() - began
    e2e_rate = args.images / seconds
    # Without the start (workers' imports, compiles, first batch): from the first images done to the last.
    steady_rate = (sum(c for _, c in finished[1:]) / (finished[-1][0] - finished[0][0])
                   if len(finished) > 2 and finished[-1][0] > finished[0][0] else e2e_rate)
    row = {
        "bench": "engine_throughput", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "images": args.images, "size": args.size, "batch": batch,
        "batch_pixels": engine.max_batch_pixels, "unet": f"{args.base}x{args.depth}", "compile": args.compile,
        "gpu_codec": engine.gpu_jpeg, "gpu_encode_share": args.gpu_encode_share, "gpu_decode": engine.gpu_decode,
        "shard_size": args.shard_size,
        # the share the split reached (one process: this engine ran the shards; workers have their own)
        "gpu_encode_share_at_end": round(engine.encode_split.share, 2) if engine.gpu_jpeg and summary["workers"] == 1
        else None,
        "warmup_s": round(warmup_s, 1),
        "model_img_per_s": round(model_rate, 1), "e2e_img_per_s": round(e2e_rate, 1),
        "e2e_over_model": round(e2e_rate / model_rate, 3), "e2e_seconds": round(seconds, 2),
        "e2e_steady_img_per_s": round(steady_rate, 1), "steady_over_model": round(steady_rate / model_rate, 3),
        "counts": counts, "workers": summary["workers"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if summary["workers"] > 1 else None,  # otherwise the children are make_images' encoders
    }
    print(json.dumps(row), flush=True)
    print(f"\n{args.images} images at {args.size}px, batch {batch}, {summary['workers']} worker(s) on {row['device']}"
          f"{', compiled' if args.compile else ''}")
    print(f"{'model only':<28}{model_rate:>10.1f} img/s")
    print(f"{'end to end':<28}{e2e_rate:>10.1f} img/s  {e2e_rate / model_rate:.2f}x the model")
    print(f"{'end to end, after the start':<28}{steady_rate:>10.1f} img/s  {steady_rate / model_rate:.2f}x the model")
    engine.close()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
