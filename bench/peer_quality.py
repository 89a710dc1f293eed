"""Quality at equal training time: this project's UNet against the Johnson TransformerNet peer.

Every model gets the same photos, the same perceptual loss, the same crop size and batch size, and the same
wall-clock budget. Step counts are set from a short timing of each model's training step, so every run
completes its full learning-rate schedule inside the budget. The UNet pays for its autoencoder priming out of
its own budget (``--priming-share``), although in production one priming serves every style;
``--cached-priming-s`` adds each UNet run the production way (priming done beforehand, outside the budget). Distances are
measured on held-out photos (every ``--held-out-every``-th file, sorted by name) that no model trained on.

    .venv/bin/python bench/peer_quality.py --photos DIR --style FILE [--vgg-weights FILE] [--budget-s 120]
        [--unets 16x2x3,16x4x3] [--size 256] [--batch 8] [--out result.json] [--sheet sheet.jpg]

Prints one JSON line per model and a table; writes a contact sheet (photo | each model) of held-out photos.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import add_vgg_weights, existing_file, existing_folder, load_vgg_or_exit, positive_int  # noqa: E402
from transformer_net import TransformerNet  # noqa: E402

from stylecore.evaluate import contact_sheet, evaluate  # noqa: E402
from stylecore.images import decode_image, image_to_tensor, resize_long_side, tensor_to_image  # noqa: E402
from stylecore.losses import (  # noqa: E402
    LossConfig, PerceptualLoss, StyleTarget, layers_needed, resolve_layers,
)
from stylecore.model import UNet, UNetConfig  # noqa: E402
from stylecore.stylize import autocast_for  # noqa: E402
from stylecore.train import PRESETS, TrainConfig, autoencoder_objective, prime_autoencoder, train_network  # noqa: E402
from stylecore.vgg import VGGFeatures  # noqa: E402


def read_split(folder: Path, every: int, limit: int | None) -> tuple[list, list]:
    """The photos under ``folder`` (recursive, sorted, the first ``limit``), decoded: every ``every``-th held out."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    if len(paths) < 2:
        sys.exit(f"{Path(sys.argv[0]).name}: {folder} holds {len(paths)} photos (.jpg, .jpeg, .png, searched recursively); "
                 "it needs at least two, one to train on and one held out")
    images = [decode_image(p.read_bytes()) for p in paths]
    held = [image for i, image in enumerate(images) if i % every == 0]
    train = [image for i, image in enumerate(images) if i % every != 0]
    return train, held


def seconds_per_step(make_model, objective, photos, config: TrainConfig, device, steps: int = 14) -> float:
    """Seconds per step from steps 3..N of a short run (the first steps pay for allocation and autotuning)."""
    stamps: list[float] = []
    probe = TrainConfig(**{**config.to_dict(), "steps": steps, "epochs": None})
    train_network(make_model(), objective, photos[:64], probe, device,
                  on_step=lambda step, total, losses: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2)


def parse_unet_spec(spec: str) -> UNetConfig:
    """BASExDEPTH[xNORM_LEVELS[xFIRST_SKIP_LEVEL[xRES_BLOCKS[xRES_LEVEL]]]][/FIELD=VALUE...] to a UNetConfig."""
    shape, *overrides = spec.split("/")
    base, depth, *rest = (int(part) for part in shape.split("x"))
    fields = {"base_channels": base, "depth": depth, "norm_levels": rest[0] if rest else None}
    fields.update(zip(("first_skip_level", "res_blocks", "res_level"), rest[1:]))
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in UNetConfig.__dataclass_fields__:
            raise ValueError(f"UNetConfig has no field {key!r}")
        fields[key] = None if value == "None" else int(value) if value.lstrip("-").isdigit() else value
    return UNetConfig(**fields)


@torch.inference_mode()
def stylize_whole(model: torch.nn.Module, image, device) -> Image.Image:
    batch = image_to_tensor(image).unsqueeze(0).to(device).float().div_(255)
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (0, (-width) % 16, 0, (-height) % 16), mode="reflect")
    with autocast_for(device):
        output = model(padded)[..., :height, :width]
    return tensor_to_image(output.float().clamp(0, 1).mul(255).round().to(torch.uint8)[0].cpu())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=existing_folder, required=True)
    parser.add_argument("--style", type=existing_file, required=True)
    add_vgg_weights(parser)
    parser.add_argument("--budget-s", type=float, default=120.0, help="training wall time per model, priming included")
    parser.add_argument("--priming-share", type=float, default=0.02,
                        help="share of the UNet's budget spent priming (the strict comparison); the fast preset primes "
                             "briefly (a short warm start ended closer to both style and photo than a long one)")
    parser.add_argument("--cached-priming-s", type=float, default=0.0,
                        help="also run each UNet as production does: priming (this long) done once beforehand and "
                             "cached, the whole budget for the style")
    parser.add_argument("--unets", default="16x2x3,16x4x3",
                        help="UNet variants, comma separated, as BASExDEPTH[xNORMED_LEVELS[xFIRST_SKIP_LEVEL[xRES_BLOCKS"
                             "[xRES_LEVEL]]]] and any /FIELD=VALUE of UNetConfig (16x2x3/res_blocks=2/norm=group)")
    parser.add_argument("--priming-content-weight", type=float, default=0.0,
                        help="add the VGG content distance to the priming objective with this weight")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--style-lr", type=float, default=PRESETS["fast"].style.learning_rate,
                        help="the UNet's style-training learning rate (default: the fast preset's)")
    parser.add_argument("--peer-lr", type=float, default=5e-4,
                        help="the peer's learning rate; at Johnson et al.'s 1e-3 it collapsed into blobs in 4 of 6 "
                             "CPU runs with this loss, at 5e-4 in one (The Scream, seed 1)")
    parser.add_argument("--content-weight", type=float, default=LossConfig.content_weight,
                        help="the loss's content weight, for both models (style weight 1)")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights and crops; rerun with others to see the spread")
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--style-size", type=positive_int, default=512)
    parser.add_argument("--held-out-every", type=positive_int, default=10)
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N photos")
    parser.add_argument("--eval-size", type=positive_int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sheet", type=Path, default=None)
    args = parser.parse_args()
    unet_configs: dict[str, UNetConfig] = {}
    for spec in filter(None, args.unets.split(",")):
        try:
            unet_configs[spec] = parse_unet_spec(spec)
        except (TypeError, ValueError) as error:
            parser.error(f"--unets {spec!r}: {error}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_photos, held_photos = read_split(args.photos, args.held_out_every, args.limit)
    features, source = load_vgg_or_exit(args.vgg_weights)
    loss_config = LossConfig(content_weight=args.content_weight)
    vgg = VGGFeatures(features, source, layers_needed(source, loss_config)).to(device)
    style_layers, _ = resolve_layers(source, loss_config)
    style = resize_long_side(decode_image(args.style.read_bytes()), args.style_size)
    target = StyleTarget.from_image(vgg, image_to_tensor(style).float().div(255).to(device), style_layers)
    loss = PerceptualLoss(vgg, loss_config, target).to(device)
    prime_objective = autoencoder_objective(vgg, args.priming_content_weight)  # what priming computes, for its timing
    style_config = TrainConfig(image_size=args.size, batch_size=args.batch, steps=1, learning_rate=args.style_lr,
                               seed=args.seed)
    prime_config = TrainConfig(image_size=args.size, batch_size=args.batch, steps=1, learning_rate=2e-3, seed=args.seed)
    print(f"{len(train_photos)} training photos, {len(held_photos)} held out; budget {args.budget_s:.0f} s per model "
          f"on {device}", flush=True)

    candidates: dict[str, tuple] = {}
    for spec, config in unet_configs.items():
        candidates[f"unet_{spec}"] = ("unet", config, args.priming_share)
        if args.cached_priming_s > 0:
            candidates[f"unet_{spec}_cached_priming"] = ("unet", config, None)
    if not args.no_peer:
        candidates["transformer_net"] = ("peer", None, None)

    results, trained = [], {}
    for name, (kind, unet_config, priming_share) in candidates.items():
        began = time.perf_counter()
        if kind == "unet":
            style_step = seconds_per_step(lambda: UNet(unet_config), loss, train_photos, style_config, device)
            prime_step = seconds_per_step(lambda: UNet(unet_config), prime_objective, train_photos, prime_config, device)
            if priming_share is None:  # cached priming: outside the budget
                prime_steps = max(1, int(args.cached_priming_s / prime_step))
                style_steps = max(1, int(args.budget_s / style_step))
            else:
                prime_steps = max(1, int(args.budget_s * priming_share / prime_step))
                style_steps = max(1, int(args.budget_s * (1 - priming_share) / style_step))
            calibration = time.perf_counter() - began
            primed = prime_autoencoder(train_photos, unet_config,
                                       TrainConfig(**{**prime_config.to_dict(), "steps": prime_steps}), device,
                                       content_vgg=vgg, content_weight=args.priming_content_weight)
            start = UNet(unet_config)
            start.load_state_dict(primed.model.state_dict())
            result = train_network(start, loss, train_photos,
                                   TrainConfig(**{**style_config.to_dict(), "steps": style_steps}), device)
            seconds = result.seconds + (primed.seconds if priming_share is not None else 0.0)
            steps = {"priming_steps": prime_steps, "style_steps": style_steps,
                     "priming_s": round(primed.seconds, 1), "style_s": round(result.seconds, 1),
                     "style_step_ms": round(style_step * 1000, 1)}
        else:
            torch.manual_seed(args.seed)
            peer_config = TrainConfig(**{**style_config.to_dict(), "learning_rate": args.peer_lr})
            style_step = seconds_per_step(TransformerNet, loss, train_photos, peer_config, device)
            style_steps = max(1, int(args.budget_s / style_step))
            calibration = time.perf_counter() - began
            torch.manual_seed(args.seed)
            result = train_network(TransformerNet(), loss, train_photos,
                                   TrainConfig(**{**peer_config.to_dict(), "steps": style_steps}), device)
            seconds = result.seconds
            steps = {"style_steps": style_steps, "style_s": round(result.seconds, 1),
                     "style_step_ms": round(style_step * 1000, 1)}
        model = result.model.to(device).eval()
        trained[name] = model
        scores = evaluate(model, loss, held_photos, image_size=args.eval_size)
        row = {"model": name, "device": str(device), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               "budget_s": args.budget_s, "trained_s": round(seconds, 1), "calibration_s": round(calibration, 1),
               **steps, "style_distance": round(scores.model.style, 4), "content_distance": round(scores.model.content, 4),
               "style_by_layer": {layer: round(value, 4) for layer, value in scores.model_style_by_layer.items()},
               "identity_style_distance": round(scores.identity.style, 4), "held_out": scores.images,
               "eval_size": scores.image_size, "train_size": args.size, "batch": args.batch,
               "content_weight": args.content_weight,
               # what training minimised, on the held-out photos: the two distances trade off
               "weighted_loss": round(loss_config.style_weight * scores.model.style
                                      + loss_config.content_weight * scores.model.content, 4)}
        results.append(row)
        print(json.dumps(row), flush=True)

    if args.sheet is not None:
        rows = [[photo] + [stylize_whole(m, photo, device) for m in trained.values()] for photo in held_photos[:6]]
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(rows).save(args.sheet, quality=92)
        print(f"contact sheet (photo | {' | '.join(trained)}): {args.sheet}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{'model':<18}{'params M':>9}{'steps':>12}{'trained s':>10}{'style':>9}{'content':>9}{'loss':>9}")
    for row in results:
        steps = f"{row.get('priming_steps', 0)}+{row['style_steps']}"
        print(f"{row['model']:<18}{row['params_m']:>9}{steps:>12}{row['trained_s']:>10}"
              f"{row['style_distance']:>9.4f}{row['content_distance']:>9.4f}{row['weighted_loss']:>9.4f}")


if __name__ == "__main__":
    main()
