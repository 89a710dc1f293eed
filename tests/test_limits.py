"""Limits and back-pressure: what a shard holds in memory is bounded in bytes, not only in images, so a shard of
many huge images runs in the same memory as a shard of a few. (The per-image pixel and byte limits are in
test_hostile_inputs.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylecore.model import UNet, UNetConfig
from tasks.bucket import ShardOptions, list_shards, stylize_shard
from tasks.storage import Location

HERE = Path(__file__).resolve().parent
BUDGET = 2**20


@pytest.fixture(scope="module")
def huge_images(tmp_path_factory) -> Path:
    """24 photos of 800x600 pixels of noise: about 0.5 MB each as JPEG, nothing for a codec to squeeze."""
    folder = tmp_path_factory.mktemp("huge")
    rng = np.random.default_rng(0)
    for index in range(24):
        pixels = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{index:02}.jpg", "JPEG", quality=95)
    return folder


def run_shard(source: Path, destination: Path, read_ahead: int, write_behind: int):
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    shard, = list_shards(Location(str(source)), 100)
    options = ShardOptions(read_ahead_bytes=read_ahead, write_behind_bytes=write_behind)
    return stylize_shard(shard, Location(str(source)), Location(str(destination)), {"m": model}, options)


def test_reading_ahead_and_writing_behind_stay_within_their_byte_budgets(huge_images, tmp_path):
    largest = max(path.stat().st_size for path in huge_images.iterdir())
    assert largest > BUDGET // 4  # so a count-only window of 16 images would hold several times the budget
    bounded = run_shard(huge_images, tmp_path / "bounded", BUDGET, BUDGET)
    assert bounded.counts["ok"] == 24
    assert bounded.peak_read_ahead_bytes <= BUDGET
    assert bounded.peak_write_behind_bytes <= BUDGET + largest  # the newest output is always let in
    unbounded = run_shard(huge_images, tmp_path / "unbounded", 2**40, 2**40)
    assert unbounded.peak_read_ahead_bytes > 2 * BUDGET  # the budget, not the image count, was what held it


def peak_rss_mb(source: Path, destination: Path, count: int) -> float:
    result = subprocess.run([sys.executable, str(HERE / "shard_memory.py"), str(source), str(destination), str(count),
                             str(BUDGET), str(BUDGET)], capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["counts"]["ok"] == count
    return report["peak_rss_mb"]


def test_a_shard_of_many_huge_images_peaks_at_the_memory_of_a_few(huge_images, tmp_path):
    few = peak_rss_mb(huge_images, tmp_path / "few", 6)
    many = peak_rss_mb(huge_images, tmp_path / "many", 24)
    print(f"peak RSS: 6 huge images {few:.0f} MB, 24 huge images {many:.0f} MB")
    assert many <= few * 1.15
