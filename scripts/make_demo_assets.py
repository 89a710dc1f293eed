"""Regenerates the demo inputs in stylecore/assets (run once by a maintainer; the outputs are committed).

Photos: public-domain / CC0 photographs that ship inside scikit-image and matplotlib wheels (their
docstrings give the licences), scaled to a long side of 384 px. Style: a swirling brush-stroke
"painting" generated here from a fixed seed, so the project owns it outright (CC0).

    python scripts/make_demo_assets.py SKIMAGE_DATA_DIR GRACE_HOPPER_JPG
"""

import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

ASSETS = Path(__file__).resolve().parent.parent / "stylecore" / "assets"
PHOTOS = {  # file in scikit-image's data folder -> licence as its docstring states it
    "astronaut.png": "public domain (NASA)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "rocket.jpg": "public domain (SpaceX)",
}


def save_photo(source: Path, name: str) -> None:
    image = Image.open(source).convert("RGB")
    image.thumbnail((384, 384), Image.Resampling.LANCZOS)
    image.save(ASSETS / "photos" / name, "JPEG", quality=88)


def swirl_painting(size: int = 512, seed: int = 7) -> Image.Image:
    """Short curved strokes following a field of vortices, in a night-sky palette."""
    rng = random.Random(seed)
    vortices = [(rng.uniform(0, size), rng.uniform(0, size), rng.choice((-1, 1)) * rng.uniform(0.6, 1.4))
                for _ in range(7)]
    palette = [(16, 38, 92), (28, 64, 140), (52, 104, 180), (94, 150, 210), (232, 204, 84),
               (246, 232, 150), (20, 80, 90), (200, 120, 40), (250, 250, 235)]
    weights = [5, 6, 5, 4, 2, 1.5, 2, 0.8, 0.7]
    image = Image.new("RGB", (size, size), (18, 30, 70))
    draw = ImageDraw.Draw(image)

    def direction(x: float, y: float) -> tuple[float, float]:
        dx, dy = 0.35, 0.08  # a gentle drift to the right
        for cx, cy, strength in vortices:
            rx, ry = x - cx, y - cy
            distance = math.hypot(rx, ry) + 20.0
            dx += strength * -ry / distance * (90.0 / distance) ** 0.5
            dy += strength * rx / distance * (90.0 / distance) ** 0.5
        norm = math.hypot(dx, dy) + 1e-9
        return dx / norm, dy / norm

    for _ in range(9000):
        x, y = rng.uniform(-10, size + 10), rng.uniform(-10, size + 10)
        colour = rng.choices(palette, weights)[0]
        jitter = [max(0, min(255, c + rng.randint(-18, 18))) for c in colour]
        width = rng.choice((3, 4, 5, 6))
        points = [(x, y)]
        for _ in range(rng.randint(6, 14)):
            dx, dy = direction(x, y)
            x, y = x + dx * 3.0, y + dy * 3.0
            points.append((x, y))
        draw.line(points, fill=tuple(jitter), width=width, joint="curve")
    return image.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    skimage_data, grace_hopper = Path(sys.argv[1]), Path(sys.argv[2])
    (ASSETS / "photos").mkdir(parents=True, exist_ok=True)
    for file in PHOTOS:
        save_photo(skimage_data / file, Path(file).stem + ".jpg")
    save_photo(grace_hopper, "grace_hopper.jpg")
    swirl_painting().save(ASSETS / "style_swirls.jpg", "JPEG", quality=92)
