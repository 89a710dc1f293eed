"""The local model store under STYLIZE_HOME: trained models, cached primings, and in-progress training state.

    $STYLIZE_HOME/models/<name>/   model.safetensors, model.json, style.jpg
    $STYLIZE_HOME/primed/<key>/    model.safetensors, model.json   (key: hash of photos + configs)
    $STYLIZE_HOME/runs/<name>/     state-<id>.safetensors, state.json   (resumable training state)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import METADATA_FILE, CheckpointError, read_metadata, weights_file_of, weights_from_bytes

HOME_VARIABLE = "STYLIZE_HOME"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
_NAME = re.compile(MODEL_NAME_PATTERN)


def default_home() -> Path:
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".stylize").expanduser()


def check_model_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in (".", ".."):  # fullmatch: '$' would let a final newline in
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100, starting with a letter or digit)"
        )
    return name


def check_new_model_name(name: str) -> str:
    """A name for a model about to be trained: a valid name that a path could not take for a weights file (a
    model named "x.safetensors" trained, then could never be loaded from its folder)."""
    check_model_name(name)
    if name.lower().endswith(".safetensors"):
        raise ValueError(f"invalid model name {name!r}: it must not end in .safetensors")
    return name


@dataclass
class ModelStore:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_dir(self, name: str) -> Path:
        """The folder a model of this new name is trained into."""
        return self.models / check_new_model_name(name)

    def primed_dir(self, key: str) -> Path:
        return self.root / "primed" / key

    def run_dir(self, kind: str, name: str) -> Path:
        return self.root / "runs" / kind / name

    def resolve(self, name_or_path: str) -> Path:
        """A model folder (or .safetensors file) by path, or by name in the store. A plain name is the store's model
        even where the current folder holds something of that name that is no model (say, a run's outputs)."""
        path = Path(name_or_path).expanduser()
        in_store = self.models / name_or_path
        stored = _NAME.fullmatch(name_or_path) is not None and name_or_path not in (".", "..") \
            and (in_store / METADATA_FILE).is_file()
        a_model = (path.is_dir() and (path / METADATA_FILE).is_file()) or (path.is_file() and path.suffix == ".safetensors")
        if path.exists() and (a_model or not stored):
            return path
        if stored:
            return in_store
        known = ", ".join(name for name, _ in self.list()) or "none yet"
        raise CheckpointError(f"no model {name_or_path!r} (not a path, and not in {self.models}; models there: {known})")

    def list(self) -> list[tuple[str, dict]]:
        if not self.models.is_dir():
            return []
        found = []
        for folder in sorted(self.models.iterdir()):
            if not folder.name.startswith(".") and (folder / METADATA_FILE).is_file():  # not one being written
                try:
                    metadata = read_metadata(folder)
                    weights = weights_file_of(metadata, str(folder / METADATA_FILE))
                    if not (folder / weights).is_file():
                        raise CheckpointError(f"its weights ({weights}) are missing")
                    # as a run would find them: whole, and what model.json says (a few MB a model)
                    weights_from_bytes((folder / weights).read_bytes(), metadata.get("weights_sha256"),
                                       f"its weights file ({weights})", load_tensors=False)
                    found.append((folder.name, metadata))
                except CheckpointError as error:
                    found.append((folder.name, {"error": str(error)}))
        return found
