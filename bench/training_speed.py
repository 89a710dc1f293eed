"""Training speed and what it buys: img/s of priming and style-training steps, wall time to prime and to train a
style with a preset, and the style and content distance the model reaches on held-out photos.

    python bench/training_speed.py --photos DIR --style FILE [--vgg-weights FILE] [--preset full]
        [--train-limit N] [--content-weight W] [--device cuda] [--out result.json] [--sheet sheet.jpg]
        [--save-model DIR]

Held out: every 10th photo of DIR (sorted by name), 40 of the 400 shared photos; training: the others, or the
first N of them with --train-limit (a small subset makes the `full` preset affordable on a CPU). Prints a JSON
line when priming is done and one with the whole result, then a table; --sheet writes a contact sheet (photo | output) of six held-out photos, --save-model the trained model
(to evaluate or look at elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from arguments import add_vgg_weights, existing_file, existing_folder, load_vgg_or_exit, positive_int  # noqa: E402
from peer_quality import read_split  # noqa: E402
from stylecore.checkpoint import save_model  # noqa: E402
from stylecore.evaluate import contact_sheet, evaluate  # noqa: E402
from stylecore.images import decode_image, image_to_tensor, resize_long_side, tensor_to_image  # noqa: E402
from stylecore.losses import LossConfig, PerceptualLoss, StyleTarget, layers_needed, resolve_layers  # noqa: E402
from stylecore.model import UNetConfig  # noqa: E402
from stylecore.recipes import run_priming, run_style_training  # noqa: E402
from stylecore.stylize import stylize_batch  # noqa: E402
from stylecore.train import PRESETS  # noqa: E402
from stylecore.vgg import VGGFeatures  # noqa: E402


def step_rate(history: list[dict], batch: int) -> float:
    """img/s over the logged history after the first log interval (which pays for warm-up)."""
    if len(history) < 3:
        return float("nan")
    first, last = history[0], history[-1]
    return (last["step"] - first["step"]) * batch / (last["seconds"] - first["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=existing_folder, required=True)
    parser.add_argument("--style", type=existing_file, required=True)
    add_vgg_weights(parser)
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--train-limit", type=positive_int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--content-weight", type=float, default=LossConfig.content_weight)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sheet", type=Path, default=None)
    parser.add_argument("--save-model", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train, held = read_split(args.photos, every=10, limit=None)
    train = train[: args.train_limit]  # the same held-out photos whatever the limit
    preset = PRESETS[args.preset]
    features, source = load_vgg_or_exit(args.vgg_weights)
    loss_config = LossConfig(content_weight=args.content_weight)
    vgg = VGGFeatures(features, source, layers_needed(source, loss_config))
    style = decode_image(args.style.read_bytes())

    def progress(phase: str, began: float):
        def report(step: int, total: int, losses: dict) -> None:
            if step % 500 == 0:  # so that a run stopped by a time limit still says how far it got
                print(f"{phase} step {step}/{total} at {time.perf_counter() - began:.1f}s", file=sys.stderr, flush=True)
        return report

    began = time.perf_counter()
    primed, prime_meta = run_priming(train, "bench", UNetConfig(), preset.prime, device,
                                     on_step=progress("priming", began))
    prime_s = time.perf_counter() - began
    print(json.dumps({"bench": "training_speed", "phase": "priming", "steps": prime_meta["steps"],
                      "seconds": round(prime_s, 1)}), flush=True)
    began = time.perf_counter()
    model, style_meta, _ = run_style_training(
        "bench", train, "bench", style, str(args.style), "-", preset.style_size, primed, {}, vgg, loss_config,
        preset.style, device, preset=args.preset, on_step=progress("style", began))
    style_s = time.perf_counter() - began

    style_layers, _ = resolve_layers(source, loss_config)
    target = StyleTarget.from_image(vgg.to(device), image_to_tensor(resize_long_side(style, preset.style_size))
                                    .float().div(255).to(device), style_layers)
    scores = evaluate(model.to(device), PerceptualLoss(vgg, loss_config, target), held, image_size=256)
    row = {
        "bench": "training_speed", "preset": args.preset, "unet": UNetConfig().to_dict(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "train_photos": len(train), "held_out": len(held),
        "priming_steps": prime_meta["steps"], "priming_s": round(prime_s, 1),
        "priming_img_per_s": round(step_rate(prime_meta["history"], preset.prime.batch_size), 1),
        "style_steps": style_meta["steps"], "style_s": round(style_s, 1),
        "style_img_per_s": round(step_rate(style_meta["history"], preset.style.batch_size), 1),
        "crop": preset.style.image_size, "batch": preset.style.batch_size, "content_weight": args.content_weight,
        "style_distance": round(scores.model.style, 4), "content_distance": round(scores.model.content, 4),
        "identity_style_distance": round(scores.identity.style, 4),
    }
    print(json.dumps(row), flush=True)
    print(f"\n{args.preset} preset on {row['device']}, {len(train)} training photos, {len(held)} held out")
    print(f"{'priming':<10}{row['priming_steps']:>7} steps{row['priming_s']:>9.1f} s{row['priming_img_per_s']:>9.1f} img/s")
    print(f"{'style':<10}{row['style_steps']:>7} steps{row['style_s']:>9.1f} s{row['style_img_per_s']:>9.1f} img/s")
    print(f"distances on held-out photos: style {row['style_distance']}, content {row['content_distance']} "
          f"(identity: style {row['identity_style_distance']}, content 0)")
    if args.out is not None:
        args.out.write_text(json.dumps(row, indent=1))
    if args.sheet is not None:
        outputs = [tensor_to_image(stylize_batch(model, image_to_tensor(photo)[None])[0].cpu()) for photo in held[:6]]
        contact_sheet([[photo, output] for photo, output in zip(held, outputs)]).save(args.sheet, quality=92)
    if args.save_model is not None:
        save_model(args.save_model, model.cpu(), {k: v for k, v in style_meta.items() if k != "history"})


if __name__ == "__main__":
    main()
