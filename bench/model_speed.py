"""Model-only stylisation throughput: this project's default UNet against the Johnson TransformerNet peer,
same device, same run, several sizes and batch sizes (fp32 on CPU; bf16 autocast on CUDA).

    .venv/bin/python bench/model_speed.py [--sizes 256,512] [--batches 1,4] [--repeats 3]

Untrained weights (speed does not depend on them). Prints a table and one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_net import TransformerNet  # noqa: E402

from stylecore.model import UNet, UNetConfig  # noqa: E402
from stylecore.stylize import autocast_for  # noqa: E402


def images_per_second(model: torch.nn.Module, size: int, batch: int, repeats: int, device: torch.device) -> float:
    images = torch.rand(batch, 3, size, size, device=device)
    with torch.inference_mode(), autocast_for(device):
        model(images)  # warm-up
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {"unet": UNet(UNetConfig()).eval().to(device), "transformer_net": TransformerNet().eval().to(device)}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            rates = {name: images_per_second(m, size, batch, args.repeats, device) for name, m in models.items()}
            row = {"device": str(device), "size": size, "batch": batch,
                   **{f"{name}_img_per_s": round(rate, 2) for name, rate in rates.items()},
                   "unet_over_peer": round(rates["unet"] / rates["transformer_net"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nparams: UNet {params['unet'] / 1e6:.2f} M, TransformerNet {params['transformer_net'] / 1e6:.2f} M "
          f"on {device}, {torch.get_num_threads()} threads")
    print(f"{'size':>6}{'batch':>7}{'UNet img/s':>12}{'peer img/s':>12}{'ratio':>8}")
    for row in rows:
        print(f"{row['size']:>6}{row['batch']:>7}{row['unet_img_per_s']:>12.2f}{row['transformer_net_img_per_s']:>12.2f}"
              f"{row['unet_over_peer']:>8.2f}")


if __name__ == "__main__":
    main()
