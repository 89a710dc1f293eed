"""Shared fixtures: real (small) images and real VGG weights.

The VGG weights are the normalised VGG-19 from ../shared/data when it is there. Elsewhere a VGG-19
file in torchvision's layout with untrained weights is written, which exercises the same loading code
(only the numbers differ, and no test depends on them).
"""

from __future__ import annotations

import os

import tempfile

# gcsfs's default filesystem cannot talk to a plain-HTTP emulator; this must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Prefect writes its database and results under PREFECT_HOME: never the user's ~/.prefect in tests.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="stylize-tests-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
import torchvision.models.vgg as vgg_module
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
SHARED_VGG = REPO.parent / "shared" / "data" / "vgg" / "vgg19_normalised_relu3_1.pth"
ASSETS = Path(str(resources.files("stylecore") / "assets"))


def write_vgg_file(path: Path, cfg: str, num_modules: int, seed: int = 0) -> Path:
    """A VGG features state dict (torchvision layout, keys ``features.N.*``) with untrained weights."""
    torch.manual_seed(seed)
    features = vgg_module.make_layers(vgg_module.cfgs[cfg])[:num_modules]
    state = {f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="session")
def vgg_weights(tmp_path_factory) -> Path:
    if SHARED_VGG.is_file():
        return SHARED_VGG
    folder = tmp_path_factory.mktemp("vgg")
    path = write_vgg_file(folder / "vgg19_relu3_1.safetensors", "E", 12)
    (folder / "vgg19_relu3_1.json").write_text(json.dumps({"architecture": "VGG-19 features[:12]"}))
    return path


@pytest.fixture(scope="session")
def bundled_photos() -> list[Path]:
    return sorted((ASSETS / "photos").glob("*.jpg"))


@pytest.fixture
def photo_dir(tmp_path, bundled_photos) -> Path:
    """The bundled public-domain photos, scaled to a long side of 48 px, in a nested folder layout."""
    folder = tmp_path / "photos"
    for index, source in enumerate(bundled_photos):
        target = folder / ("sub" if index % 2 else "") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(source).convert("RGB")
        image.thumbnail((48, 48))
        image.save(target, "JPEG", quality=90)
    return folder


@pytest.fixture
def style_image(tmp_path) -> Path:
    path = tmp_path / "style.jpg"
    image = Image.open(ASSETS / "style_swirls.jpg").convert("RGB")
    image.thumbnail((96, 96))
    image.save(path, "JPEG", quality=92)
    return path


@pytest.fixture
def small_pil_photos(photo_dir) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(photo_dir.rglob("*.jpg"))]


# Test tensors are tiny: one thread is as fast as two and immune to a busy neighbour's spinning threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real GCS emulator (gcp-storage-emulator) on a free loopback port, in memory, for the whole session."""
    import socket

    from gcp_storage_emulator.server import create_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="photos")
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}
    server.stop()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (and database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path, monkeypatch, vgg_weights):
    """A fresh $STYLIZE_HOME, with $STYLIZE_VGG_WEIGHTS pointing at the session's VGG weights."""
    monkeypatch.setenv("STYLIZE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STYLIZE_VGG_WEIGHTS", str(vgg_weights))
    return tmp_path / "home"
