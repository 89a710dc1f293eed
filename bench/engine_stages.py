"""Where end-to-end time goes: each stage of a bucket run timed alone on the same images (the profile behind
engine_throughput's ratio). One JSON line of img/s per stage.

    python bench/engine_stages.py --images 2000 --size 512 [--compile] [--photos DIR] [--work DIR]

Stages: read (16 threads, storage layer), header (PIL header probe, one thread), decode on the CPU (one thread
per core: libjpeg-turbo through torchvision as the engine does, and PIL's path for comparison; on a GPU batched
nvjpeg too, warmed up), model (the engine's forward), encode on the GPU (nvjpeg, warmed up) and on the CPU
(torchvision, and PIL for comparison), write (16 threads, storage layer's atomic write), and the engine alone on
bytes held in memory (decode, model and encode overlapped, no storage), JPEG outputs encoded by nvjpeg, by the CPU
threads, or split between them (the default; the share it ended at is reported); with --compile also the compiled
model and the engine with it, each encoding, and the split with decoding on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, JpegImagePlugin

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from arguments import existing_folder, positive_int  # noqa: E402
from engine_throughput import make_images  # noqa: E402

from stylecore import engine as engine_module  # noqa: E402
from stylecore.engine import EngineConfig, Job, StylizeEngine  # noqa: E402
from stylecore.images import (  # noqa: E402
    decode_image,
    decode_plain_jpeg,
    encode_image,
    encode_jpeg_tensor,
    image_to_tensor,
    tensor_to_image,
)
from stylecore.model import UNet, UNetConfig  # noqa: E402
from tasks.storage import Location, read_bytes, write_bytes  # noqa: E402


def timed(function, count: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round(count / (time.perf_counter() - began), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=2000)
    parser.add_argument("--size", type=positive_int, default=512)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--photos", type=existing_folder, default=REPO / "stylecore" / "assets" / "photos")
    parser.add_argument("--work", type=Path, default=Path("/tmp/engine-stages"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled model, and the engine in memory with it (each codec choice)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cores = os.cpu_count() or 2
    images = args.work / f"images-{args.images}-{args.size}"
    if not images.exists():
        make_images(images.with_suffix(".tmp"), args.photos, args.images, args.size)
        images.with_suffix(".tmp").rename(images)
    paths = sorted(images.rglob("*.jpg"))
    n, b = len(paths), args.batch
    rates: dict[str, float] = {}

    with ThreadPoolExecutor(16) as io_pool, ThreadPoolExecutor(cores) as cpu_pool:
        datas: list[bytes] = []
        rates["read_16_threads"] = timed(lambda: datas.extend(io_pool.map(lambda p: read_bytes(Location(str(p))), paths)),
                                        n, device)
        rates["header_1_thread"] = timed(lambda: [engine_module._Header.read(d, 10**9) for d in datas], n, device)
        decoded: list[torch.Tensor] = []
        encode_jpeg_tensor(decode_plain_jpeg(datas[0]))  # loads the codec library: not a stage's cost
        rates[f"decode_cpu_{cores}_threads"] = timed(lambda: decoded.extend(cpu_pool.map(decode_plain_jpeg, datas)),
                                                      n, device)
        rates[f"decode_cpu_pil_{cores}_threads"] = timed(
            lambda: list(cpu_pool.map(lambda d: image_to_tensor(decode_image(d)), datas)), n, device)
        if device.type == "cuda":  # batched nvjpeg, after a warm-up batch (its first call sets nvjpeg up)
            from torchvision.io import ImageReadMode, decode_jpeg

            encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
            decode_jpeg(encoded[:b], mode=ImageReadMode.RGB, device=device)
            rates["decode_gpu_nvjpeg_batched"] = timed(
                lambda: [decode_jpeg(encoded[i:i + b], mode=ImageReadMode.RGB, device=device) for i in range(0, n, b)],
                n, device)
        model = UNet(UNetConfig()).eval().to(device)
        engine = StylizeEngine({"m": model}, device, EngineConfig(batch_size=b))
        batch = torch.stack([decoded[i % n] for i in range(b)]).to(device)  # a full batch, even from fewer images
        engine.forward(engine.models["m"], batch)
        repeats = max(1, n // b)
        rates["model_eager"] = timed(lambda: [engine.forward(engine.models["m"], batch) for _ in range(repeats)],
                                     repeats * b, device)
        outputs = engine.forward(engine.models["m"], batch)
        if device.type == "cuda":
            engine_module._nvjpeg_encode(list(outputs), 90)  # warm-up: the first call sets nvjpeg up
            rates["encode_gpu_nvjpeg"] = timed(
                lambda: [engine_module._nvjpeg_encode(list(outputs), 90) for _ in range(repeats)], repeats * b, device)
            sample = engine_module._nvjpeg_encode([outputs[0]], 90)[0]
            sampling = JpegImagePlugin.get_sampling(Image.open(io.BytesIO(sample)))
            print(f"nvjpeg chroma sampling: {({0: '4:4:4', 1: '4:2:2', 2: '4:2:0'}).get(sampling, sampling)}",
                  file=sys.stderr)
        cpu_outputs = outputs.cpu()
        rates[f"encode_cpu_{cores}_threads"] = timed(
            lambda: list(cpu_pool.map(lambda i: encode_jpeg_tensor(cpu_outputs[i % b], 90), range(n))), n, device)
        rates[f"encode_cpu_pil_{cores}_threads"] = timed(
            lambda: list(cpu_pool.map(lambda i: encode_image(tensor_to_image(cpu_outputs[i % b]), "jpeg", 90),
                                      range(n))), n, device)
        target = args.work / "written"
        shutil.rmtree(target, ignore_errors=True)
        rates["write_16_threads"] = timed(
            lambda: list(io_pool.map(lambda i: write_bytes(Location(str(target / f"d{i // 1000}" / f"{i}.jpg")),
                                                           datas[i]), range(n))), n, device)
        # The whole engine (decode, model, encode, overlapped) on bytes already in memory: one process's ceiling. JPEG
        # outputs encoded by nvjpeg alone, by the CPU threads alone, or split between them as the engine finds.
        cuda = device.type == "cuda"
        encodes = {"nvjpeg": {"gpu_encode_share": 1.0}, "split": {}, "cpu": {"gpu_codec": False}} if cuda \
            else {"cpu": {"gpu_codec": False}}
        variants = [("", encode, settings) for encode, settings in encodes.items()]
        if args.compile:
            variants += [("compiled_", encode, {"compile": True, **settings}) for encode, settings in encodes.items()]
            if cuda:
                variants.append(("compiled_", "split", {"compile": True, "gpu_decode": False}))
        shares: dict[str, float] = {}
        for prefix, encode, settings in variants:
            with StylizeEngine({"m": model}, device, EngineConfig(batch_size=b, **settings)) as run_engine:
                if prefix and "model_compiled" not in rates:
                    run_engine.forward(run_engine.models["m"], batch)  # compiles
                    rates["model_compiled"] = timed(
                        lambda: [run_engine.forward(run_engine.models["m"], batch) for _ in range(repeats)],
                        repeats * b, device)
                list(run_engine.run(Job(i, datas[i], ("m",)) for i in range(min(n, 2 * b))))  # warm-up
                name = f"engine_in_memory_{prefix}encode_{encode}" + ("_cpu_decode" if "gpu_decode" in settings else "")
                rates[name] = timed(
                    lambda: list(run_engine.run(Job(i, d, ("m",)) for i, d in enumerate(datas))), n, device)
                if encode == "split":
                    shares[name] = round(run_engine.encode_split.share, 2)
        engine.close()
    row = {"bench": "engine_stages", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "images": n, "size": args.size, "batch": b, "img_per_s": rates,
           "gpu_encode_share_at_end": shares}
    print(json.dumps(row), flush=True)
    print(f"\n{n} images at {args.size}px, batch {b}, on {row['device']}")
    width = max(map(len, rates)) + 2
    for name, rate in rates.items():
        print(f"{name:<{width}}{rate:>10.1f} img/s")


if __name__ == "__main__":
    main()
