"""Training: priming the UNet as an autoencoder, then training it per style from the primed weights.

Both loops are the same loop with a different objective: random square crops of the photos, Adam with
a cosine-decayed learning rate, losses averaged into a history every ``log_every`` steps. Everything
random comes from one seeded generator, so a run is reproducible, and its state is checkpointed every
``checkpoint_every`` steps into ``state_dir`` so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .checkpoint import load_state, save_state
from .images import image_to_tensor, resize_short_side
from .losses import PerceptualLoss, content_distance_per_image, reconstruction_loss
from .model import UNet, UNetConfig
from .vgg import VGGFeatures


@dataclass
class TrainConfig:
    """One training phase. Exactly one of ``steps`` and ``epochs`` decides its length."""

    image_size: int = 256  # side of the square training crops
    batch_size: int = 8
    steps: int | None = None
    epochs: float | None = None  # passes over the photo set, in batches of batch_size
    learning_rate: float = 1e-3
    final_learning_rate_fraction: float = 0.1  # cosine decay to this fraction of learning_rate
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps and epochs")
        for name in ("image_size", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and not 0 < self.epochs < math.inf):
            raise ValueError("the number of steps or epochs must be positive (and finite)")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")

    def total_steps(self, num_photos: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * math.ceil(num_photos / self.batch_size)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Preset:
    prime: TrainConfig
    style: TrainConfig
    style_size: int  # long side of the style image when its Grams are computed


PRESETS: dict[str, Preset] = {
    # A few minutes on 2 CPU cores: small crops, few steps. Good enough to see the style arrive.
    "fast": Preset(
        # A short warm start, not a full autoencoder: at equal style steps a net primed for 426 steps ended
        # further from the style (0.167 against 0.112) and the photos (0.605 against 0.584) than one primed for
        # 24 (The Scream, held-out photos; bench/peer_quality.py --cached-priming-s).
        prime=TrainConfig(image_size=128, batch_size=4, steps=25, learning_rate=2e-3, checkpoint_every=50),
        # 3e-3 measured best of 1e-3 / 3e-3 / 1e-2 at this size and batch (style 0.159 / 0.126 / 0.163 on held-out photos)
        style=TrainConfig(image_size=128, batch_size=4, steps=300, learning_rate=3e-3, checkpoint_every=50),
        style_size=256,
    ),
    # The original project's budget: ~60 epochs priming, ~120 epochs style, 256 px crops. Meant for a GPU.
    "full": Preset(
        # Priming in batches of 16: half the steps for the same epochs. A GPU step of this small net costs about
        # the same at 8 or 16 crops (launch-bound: 2,700 steps of 8 took 36.6 s on an H200), and the style trained
        # from it is no worse (CPU, 128 px, 48 photos, 2 seeds: style 0.1283 / content 0.4938 against 0.1298 /
        # 0.5035 when primed in batches of 8).
        prime=TrainConfig(image_size=256, batch_size=16, epochs=60, learning_rate=2e-3, checkpoint_every=500),
        style=TrainConfig(image_size=256, batch_size=8, epochs=120, learning_rate=1e-3, checkpoint_every=500),
        style_size=512,
    ),
}


@dataclass
class TrainResult:
    model: UNet
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


# A sliver photo (1x20000) scaled to the crop size on its short side would take gigabytes: its middle is used.
MAX_PHOTO_ASPECT = 4


def _within_aspect(image: Image.Image, aspect: int) -> Image.Image:
    """The centre of ``image`` at most ``aspect`` times longer than wide."""
    width, height = image.size
    if width > aspect * height:
        left = (width - aspect * height) // 2
        return image.crop((left, 0, left + aspect * height, height))
    if height > aspect * width:
        top = (height - aspect * width) // 2
        return image.crop((0, top, width, top + aspect * width))
    return image


class TrainingDiverged(ArithmeticError):
    """The loss stopped being a finite number: the weights are lost, and a model of NaNs would stylise to black."""


# Called after every step with (step, total steps, the losses averaged over the last logged interval).
StepCallback = Callable[[int, int, dict[str, float]], None]


class TrainingPhotos:
    """Photos held in memory at training scale, sampled as random square crops with random flips."""

    def __init__(self, images: list[Image.Image], crop_size: int):
        if not images:
            raise ValueError("no training photos")
        self.crop_size = crop_size
        self.tensors = [image_to_tensor(resize_short_side(_within_aspect(image, MAX_PHOTO_ASPECT), crop_size))
                        for image in images]

    def __len__(self) -> int:
        return len(self.tensors)

    def to(self, device: torch.device, max_bytes: int = 2 * 1024**3) -> "TrainingPhotos":
        """Keep the photos on ``device`` when they fit in ``max_bytes``, so crops are cut there with no copy
        per step; a larger set stays in host memory."""
        if sum(t.numel() for t in self.tensors) <= max_bytes:
            self.tensors = [t.to(device) for t in self.tensors]
        return self

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A float batch (N, 3, crop, crop) in [0, 1]."""
        picks = torch.randint(len(self.tensors), (batch_size,), generator=generator).tolist()
        crops = []
        for index in picks:
            image = self.tensors[index]
            _, height, width = image.shape
            top = int(torch.randint(height - self.crop_size + 1, (1,), generator=generator))
            left = int(torch.randint(width - self.crop_size + 1, (1,), generator=generator))
            crop = image[:, top : top + self.crop_size, left : left + self.crop_size]
            if bool(torch.rand((), generator=generator) < 0.5):
                crop = crop.flip(-1)
            crops.append(crop)
        return torch.stack(crops).float().div_(255)


def prime_autoencoder(
    photos: list[Image.Image],
    model_config: UNetConfig,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    content_vgg: VGGFeatures | None = None,
    content_weight: float = 0.0,
    on_step: StepCallback | None = None,
    state_dir: Path | None = None,
) -> TrainResult:
    """Train a fresh UNet to reconstruct its input (see ``autoencoder_objective``)."""
    torch.manual_seed(config.seed)
    model = UNet(model_config)
    if content_vgg is not None and content_weight > 0:
        content_vgg.to(device)
    objective = autoencoder_objective(content_vgg, content_weight)
    return _train(model, objective, TrainingPhotos(photos, config.image_size), config, device, on_step, state_dir)


def autoencoder_objective(
    content_vgg: VGGFeatures | None = None, content_weight: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """The priming objective: pixel L1, plus ``content_weight`` times the VGG content distance at
    ``content_vgg``'s deepest layer when a VGG is given."""
    use_content = content_vgg is not None and content_weight > 0

    def objective(outputs: torch.Tensor, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        pixel = reconstruction_loss(outputs, batch)
        if not use_content:
            return {"loss": pixel, "reconstruction": pixel}
        layer = content_vgg.layers[-1]
        with torch.no_grad():
            reference = content_vgg(batch)[layer]
        content = content_distance_per_image(content_vgg(outputs)[layer], reference, relative=True).mean()
        return {"loss": pixel + content_weight * content, "reconstruction": pixel, "content": content}

    return objective


def train_style(
    photos: list[Image.Image],
    primed: UNet,
    loss: PerceptualLoss,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    on_step: StepCallback | None = None,
    state_dir: Path | None = None,
    resume_key: str = "",
) -> TrainResult:
    """Train a copy of the primed UNet to render the photos in the loss's style. A state in ``state_dir`` is resumed
    only if it was saved with the same ``resume_key`` (what else defines the run: style, loss, primed weights)."""
    model = UNet(primed.config)
    model.load_state_dict(primed.state_dict())
    return _train(model, loss, TrainingPhotos(photos, config.image_size), config, device, on_step, state_dir,
                  resume_key)


def train_network(
    model: torch.nn.Module,
    objective: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    photos: list[Image.Image],
    config: TrainConfig,
    device: str | torch.device = "cpu",
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train any image-to-image network against ``objective`` with the same loop (benchmarks train peer models)."""
    return _train(model, objective, TrainingPhotos(photos, config.image_size), config, device, on_step, None)


def _train(
    model: torch.nn.Module,
    objective: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    photos: TrainingPhotos,
    config: TrainConfig,
    device: str | torch.device,
    on_step: StepCallback | None,
    state_dir: Path | None,
    resume_key: str = "",
) -> TrainResult:
    device = torch.device(device)
    total_steps = config.total_steps(len(photos))
    model.to(device).train()
    if isinstance(objective, torch.nn.Module):
        objective.to(device)
    # fused: one kernel for the whole update on CUDA instead of several per parameter tensor
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total_steps, config.final_learning_rate_fraction))
    generator = torch.Generator().manual_seed(config.seed)
    # how often it logs and saves its state does not change what a run computes: a rerun with others resumes
    computed = {k: v for k, v in config.to_dict().items() if k not in ("log_every", "checkpoint_every")}
    signature = {"config": computed, "total_steps": total_steps, "num_photos": len(photos), "resume_key": resume_key}

    # Losses are summed on the device and read back once per log interval: reading a GPU value every step
    # stalls the step, and small-batch steps are dominated by such waits. ``summed`` counts the steps in running.
    step, history, elapsed, running, summed = 0, [], 0.0, {}, 0
    saved = load_state(state_dir) if state_dir is not None else None
    if saved is not None and saved[1].get("signature") == signature:
        tensors, document = saved
        step, history, elapsed, running, summed = _restore(tensors, document, model, optimizer, schedule,
                                                           generator, device)
    resumed_from = step

    # bf16 autocast only on CUDA: on CPUs without bf16 units it is about 100x slower.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    started = time.perf_counter() - elapsed
    photos.to(device)
    latest: dict[str, float] = {}
    while step < total_steps:
        batch = photos.sample(config.batch_size, generator).to(device, non_blocking=True)
        with autocast:
            losses = objective(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        schedule.step()
        step += 1
        for name, value in losses.items():
            running[name] = running[name] + value.detach().float() if name in running else value.detach().float()
        summed += 1
        if step % config.log_every == 0 or step == total_steps:
            latest = {name: float(total) / summed for name, total in running.items()}
            if not math.isfinite(latest["loss"]):
                raise TrainingDiverged(f"training diverged: the loss became {latest['loss']} by step {step} (a "
                                       "learning rate or loss weight too large?); no model was saved")
            history.append({"step": step, "seconds": round(time.perf_counter() - started, 3), **latest})
            running, summed = {}, 0
        if on_step is not None:
            on_step(step, total_steps, latest)
        if state_dir is not None and (step % config.checkpoint_every == 0) and step < total_steps:
            _checkpoint(state_dir, model, optimizer, schedule, generator, step, history,
                        time.perf_counter() - started, signature, running, summed)

    model.eval()
    return TrainResult(model=model, history=history, steps=step, seconds=time.perf_counter() - started,
                       resumed_from=resumed_from)


def _cosine(total_steps: int, final_fraction: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _checkpoint(state_dir, model, optimizer, schedule, generator, step, history, elapsed, signature, running,
                summed) -> None:
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, state in optimizer_state["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["generator"] = generator.get_state()
    tensors.update({f"running.{name}": total.clone() for name, total in running.items()})  # this log interval
    document = {
        "summed": summed,
        "signature": signature,
        "step": step,
        "elapsed": elapsed,
        "history": history,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": schedule.state_dict(),
    }
    save_state(state_dir, tensors, document)


def _restore(tensors, document, model, optimizer, schedule, generator, device) -> tuple[int, list, float, dict, int]:
    model.load_state_dict({name[6:]: t for name, t in tensors.items() if name.startswith("model.")})
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor.to(device) if key != "step" else tensor
    for index, scalars in document["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": document["optimizer_param_groups"]})
    schedule.load_state_dict(document["scheduler"])
    generator.set_state(tensors["generator"])
    running = {name[8:]: total.to(device) for name, total in tensors.items() if name.startswith("running.")}
    return document["step"], document["history"], document["elapsed"], running, document.get("summed", 0)


def with_overrides(config: TrainConfig, **overrides) -> TrainConfig:
    """A copy of ``config`` with the non-None overrides applied (setting steps clears epochs and vice versa)."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if "steps" in overrides:
        overrides.setdefault("epochs", None)
    elif "epochs" in overrides:
        overrides.setdefault("steps", None)
    return replace(config, **overrides)
