"""Model-only stylisation throughput: this project's default UNet against the Johnson TransformerNet peer,
same device, same run, several sizes and batch sizes (fp32 on CPU; bf16 autocast on CUDA).

    .venv/bin/python bench/model_speed.py [--sizes 256,512] [--batches 1,4] [--repeats 3] [--unets 16x2,16x4]
        [--compile]   # also torch.compile'd default UNet and peer, at the second size and the largest batch

Untrained weights (speed does not depend on them). Prints a table and one JSON line per measurement.
``STYLIZE_KEEP_FREED_MEMORY=0`` measures with glibc's malloc left as it is (see stylecore/allocator.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive_int, positive_ints  # noqa: E402
from transformer_net import TransformerNet  # noqa: E402

from stylecore.allocator import keep_freed_memory_for_reuse  # noqa: E402
from stylecore.model import UNet, UNetConfig  # noqa: E402
from stylecore.stylize import autocast_for  # noqa: E402


def images_per_second(model: torch.nn.Module, size: int, batch: int, repeats: int, device: torch.device) -> float:
    images = torch.rand(batch, 3, size, size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_for(device):
        model(images)  # warm-up (and compilation)
        model(images)
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
    return batch / best


def unet_specs(text: str) -> dict[str, tuple[int, int]]:
    """BASExDEPTH[,BASExDEPTH...], e.g. 16x2,32x4."""
    specs = {}
    for spec in text.split(","):
        try:
            base, depth = (positive_int(part) for part in spec.split("x"))
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"UNet variants look like 16x2,32x4 (BASExDEPTH), not {text!r}") from None
        specs[spec] = (base, depth)
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_ints, default="256,512")
    parser.add_argument("--batches", type=positive_ints, default="1,4")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--unets", type=unet_specs, default=f"{UNetConfig.base_channels}x{UNetConfig.depth}",
                        help="UNet variants BASExDEPTH; the first is the one compared with the peer")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    kept = keep_freed_memory_for_reuse()  # applied on import; STYLIZE_KEEP_FREED_MEMORY=0 to compare without
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {}
    for spec, (base, depth) in args.unets.items():
        models[f"unet_{spec}"] = UNet(UNetConfig(base_channels=base, depth=depth))
    models["transformer_net"] = TransformerNet()
    for name, model in models.items():
        model.eval().to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
    first = next(iter(models))
    params = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for name, m in models.items()}
    sizes, batches = args.sizes, args.batches
    runs = [(size, batch, False) for size in sizes for batch in batches]
    if args.compile:
        runs.append((sizes[-1] if len(sizes) < 2 else sizes[1], batches[-1], True))
    rows = []
    for size, batch, compiled in runs:
        rates = {}
        for name, model in models.items():
            if compiled and name not in (first, "transformer_net"):
                continue  # compiling takes long: only the default UNet and the peer
            began = time.perf_counter()
            try:
                rates[name] = images_per_second(torch.compile(model) if compiled else model, size, batch,
                                                args.repeats, device)
            except RuntimeError as error:  # e.g. a tensor too large for 32-bit indexing in reflection padding
                print(f"{name} at {size}px batch {batch}: {str(error).splitlines()[0]}", file=sys.stderr)
                rates[name] = None  # null in the JSON line
            if compiled:
                print(f"{name} compiled and measured in {time.perf_counter() - began:.0f}s", file=sys.stderr)
        row = {"bench": "model_speed", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "size": size, "batch": batch, "compiled": compiled, "keep_freed_memory": kept,
               **{f"{name}_img_per_s": None if rate is None else round(rate, 1) for name, rate in rates.items()},
               "default_over_peer": round(rates[first] / rates["transformer_net"], 2)
               if rates.get(first) and rates.get("transformer_net") else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nparams (M): {params} on {device}, {torch.get_num_threads()} threads")
    names = list(models)
    print(f"{'size':>6}{'batch':>6}{'compiled':>9}" + "".join(f"{n:>18}" for n in names) + f"{'ratio':>7}")
    def cell(value, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for row in rows:
        print(f"{row['size']:>6}{row['batch']:>6}{str(row['compiled']):>9}"
              + "".join(cell(row.get(n + "_img_per_s"), 18, 1) for n in names) + cell(row["default_over_peer"], 7, 2))


if __name__ == "__main__":
    main()
