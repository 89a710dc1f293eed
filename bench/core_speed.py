"""CPU/GPU speed of the core: stylisation (forward) and style-training step throughput of the default UNet.

    .venv/bin/python bench/core_speed.py --vgg-weights PATH [--size 256] [--batch 4] [--repeats 3]

Prints a readable table and one JSON line. Not part of the tests.
"""

import argparse
import json
import time

import torch
from arguments import add_vgg_weights, load_vgg_or_exit, positive_int

from stylecore.losses import LossConfig, PerceptualLoss, StyleTarget, layers_needed
from stylecore.model import UNet, UNetConfig
from stylecore.stylize import stylize_batch
from stylecore.vgg import VGGFeatures


def best_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vgg_weights(parser)
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = UNetConfig()
    model = UNet(config).to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)

    model.eval()
    def forward_pass():
        stylize_batch(model, images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward = best_seconds(forward_pass, args.repeats)

    features, source = load_vgg_or_exit(args.vgg_weights)
    loss_config = LossConfig()
    vgg = VGGFeatures(features, source, layers_needed(source, loss_config)).to(device)
    target = StyleTarget.from_image(vgg, torch.rand(3, args.size, args.size, device=device), source.default_layers()[0])
    loss = PerceptualLoss(vgg, loss_config, target).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss(model(images), images)["loss"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step = best_seconds(train_step, args.repeats)
    result = {
        "bench": "core_speed", "device": str(device), "threads": torch.get_num_threads(), "size": args.size, "batch": args.batch,
        "unet": config.to_dict(), "unet_params": sum(p.numel() for p in model.parameters()),
        "vgg": source.origin, "stylize_img_per_s": round(args.batch / forward, 2),
        "train_img_per_s": round(args.batch / step, 2),
    }
    print(f"UNet {config} ({result['unet_params'] / 1e6:.2f} M params) on {device}, {args.size}px, batch {args.batch}")
    print(f"  stylisation forward: {result['stylize_img_per_s']:8.2f} img/s")
    print(f"  style-training step: {result['train_img_per_s']:8.2f} img/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
