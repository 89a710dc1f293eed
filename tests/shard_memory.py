"""Stylise the first N images of a folder as one shard and print peak RSS and queue peaks as JSON.
Run in its own process by test_limits.py, so that each measurement starts from a fresh interpreter.

    python tests/shard_memory.py SOURCE DESTINATION N READ_AHEAD_BYTES WRITE_BEHIND_BYTES
"""

import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stylecore.model import UNet, UNetConfig  # noqa: E402
from tasks.bucket import ShardOptions, make_shards, stylize_shard  # noqa: E402
from tasks.storage import Location, list_files  # noqa: E402


def main() -> None:
    source, destination, count, read_ahead, write_behind = sys.argv[1:6]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    listing = list_files(Location(source))[: int(count)]
    shard, = make_shards(listing, len(listing))
    options = ShardOptions(read_ahead_bytes=int(read_ahead), write_behind_bytes=int(write_behind),
                           io_threads=4)
    result = stylize_shard(shard, Location(source), Location(destination), {"m": model}, options)
    print(json.dumps({"images": result.images, "counts": result.counts,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_read_ahead_bytes": result.peak_read_ahead_bytes,
                      "peak_write_behind_bytes": result.peak_write_behind_bytes}))


if __name__ == "__main__":
    main()
