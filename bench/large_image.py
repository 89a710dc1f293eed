"""One very large image through the engine: peak memory and time in one pass against tiles at several budgets,
and how far the tiled output is from the one-pass output.

    .venv/bin/python bench/large_image.py [--width 6000 --height 4000] [--budgets 0,8388608,2097152]
        [--model PATH] [--device cpu|cuda]

Budget 0 is one forward pass over the whole image (no tiles). Each budget runs in its own process, so peak RSS
(and on CUDA peak allocated memory) is that run's own. Prints a table and one JSON line per run. Not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from arguments import non_negative_int, positive_int
from PIL import Image

from stylecore.checkpoint import load_model
from stylecore.engine import EngineConfig, Job, StylizeEngine
from stylecore.model import UNet

ASSETS = Path(__file__).resolve().parent.parent / "stylecore" / "assets"


def test_image(width: int, height: int) -> bytes:
    """A real photo scaled up to the size asked for, as PNG (lossless, so outputs can be compared exactly)."""
    image = Image.open(ASSETS / "photos" / "coffee.jpg").convert("RGB").resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def one_run(args) -> None:
    device = torch.device(args.device)
    if args.model:
        model, _ = load_model(args.model)
    else:
        torch.manual_seed(0)
        model = UNet()
    data = test_image(args.width, args.height)
    # budget 0: a budget above the image, so it goes through in one pass
    budget = args.budget or args.width * args.height + 1
    config = EngineConfig(max_batch_pixels=budget, output_format="png", gpu_codec=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with StylizeEngine({"m": model}, device, config) as engine:
        started = time.perf_counter()
        [outcome] = list(engine.run([Job(0, data, ("m",))]))
        seconds = time.perf_counter() - started
    if outcome.error:
        raise SystemExit(outcome.error)
    Path(args.output).write_bytes(outcome.outputs["m"])
    row = {"bench": "large_image", "width": args.width, "height": args.height, "megapixels": round(args.width * args.height / 1e6, 1),
           "budget": args.budget, "device": str(device), "seconds": round(seconds, 1),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) // 2**20
    print(json.dumps(row))


def budgets(text: str) -> list[int]:
    """Pixel budgets, comma-separated; 0 is the engine's automatic one."""
    return [non_negative_int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=positive_int, default=6000)
    parser.add_argument("--height", type=positive_int, default=4000)
    parser.add_argument("--budgets", type=budgets, default="0,8388608,2097152",
                        help="pixel budgets per forward pass, comma-separated (0: the automatic one)")
    parser.add_argument("--model", default=None, help="a model folder or .safetensors; untrained default UNet if left out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/stylize-bench-large"))
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.output:
        return one_run(args)

    args.out.mkdir(parents=True, exist_ok=True)
    rows, outputs = [], {}
    for budget in args.budgets:
        output = args.out / f"budget_{budget}.png"
        command = [sys.executable, __file__, "--width", str(args.width), "--height", str(args.height), "--device",
                   args.device, "--budget", str(budget), "--output", str(output)] + (["--model", args.model] if args.model else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"budget": budget, "failed": (done.stderr.strip().splitlines() or ["killed"])[-1][:200],
                         "returncode": done.returncode})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        outputs[budget] = output
        print(json.dumps(rows[-1]), flush=True)
    if 0 in outputs:
        whole = torch.frombuffer(bytearray(Image.open(outputs[0]).tobytes()), dtype=torch.uint8).int()
        for row in rows:
            if row.get("budget") in outputs and row["budget"] != 0:
                tiled = torch.frombuffer(bytearray(Image.open(outputs[row["budget"]]).tobytes()), dtype=torch.uint8).int()
                row["max_difference_to_one_pass"] = int((tiled - whole).abs().max())
    print(f"\n{'budget (px)':>12}{'seconds':>9}{'peak RSS MB':>13}{'max diff':>10}")
    for row in rows:
        if "failed" in row:
            print(f"{row['budget']:>12}  failed: {row['failed']}")
        else:
            print(f"{row['budget'] or 'one pass':>12}{row['seconds']:>9}{row['peak_rss_mb']:>13}"
                  f"{row.get('max_difference_to_one_pass', '-'):>10}")
    print(json.dumps({"bench": "large_image", "summary": "budgets", "rows": rows}))


if __name__ == "__main__":
    main()
