"""What every benchmark parses the same way, so that a bad value is one line from argparse, not a traceback
minutes in: counts and sizes that must be positive, folders and files that must exist, and VGG weights that
default to $STYLIZE_VGG_WEIGHTS as in the CLI and the flows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stylecore.vgg import WEIGHTS_VARIABLE, VGGWeightsError, load_vgg
from stylize.cli import checked, positive_int  # the CLI's own argparse types: one rule for "a count"

non_negative_int = checked("non_negative_int", int, lambda value: value >= 0, "zero or more")  # 0: automatic
fraction = checked("fraction", float, lambda value: 0 <= value <= 1, "between 0 and 1")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers, e.g. 256,512."""
    return [positive_int(part) for part in text.split(",") if part.strip()] or [positive_int("")]


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def add_vgg_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vgg-weights", type=existing_file, default=os.environ.get(WEIGHTS_VARIABLE) or None,
                        help=f"VGG weights file (default: ${WEIGHTS_VARIABLE}, else torchvision's ImageNet vgg16)")


def load_vgg_or_exit(weights: Path | None):
    """``load_vgg(weights)``, or one line and exit status 1 when they cannot be loaded (offline without a file)."""
    try:
        return load_vgg(weights)
    except VGGWeightsError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: {error}; give --vgg-weights FILE or set ${WEIGHTS_VARIABLE}")
