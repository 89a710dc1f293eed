"""Checkpoints round-trip exactly, and anything that is not what it claims to be is refused clearly."""

import json

import pytest
import torch

from stylecore.checkpoint import CheckpointError, load_model, read_metadata, save_model
from stylecore.model import UNet, UNetConfig


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    model = UNet(UNetConfig(base_channels=8, depth=2))
    model.train()
    model(torch.rand(4, 3, 16, 16))  # move BatchNorm running statistics away from their defaults
    model.eval()
    folder = save_model(tmp_path / "m", model, {"name": "m", "steps": 7})
    return model, folder


def test_round_trip_gives_bit_identical_outputs(saved):
    model, folder = saved
    loaded, metadata = load_model(folder)
    images = torch.rand(2, 3, 23, 31)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert metadata["steps"] == 7 and metadata["architecture"]["base_channels"] == 8


def test_loading_by_safetensors_path_works_too(saved):
    _, folder = saved
    loaded, _ = load_model(folder / "model.safetensors")
    assert loaded.config == UNetConfig(base_channels=8, depth=2)


def test_mismatched_architecture_is_refused(saved):
    _, folder = saved
    with pytest.raises(CheckpointError, match="architecture mismatch"):
        load_model(folder, expected=UNetConfig(base_channels=16, depth=2))
    # Metadata that lies about the architecture: the weights do not fit, and that is said plainly.
    metadata = read_metadata(folder)
    metadata["architecture"]["base_channels"] = 16
    (folder / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="do not fit UNet"):
        load_model(folder)


def test_pickle_files_are_never_loaded(saved, tmp_path):
    model, folder = saved
    pickle_path = tmp_path / "model.pth"
    torch.save(model.state_dict(), pickle_path)
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        load_model(pickle_path)
    # The same pickle hidden under the safetensors name is refused before any unpickling.
    (folder / "model.safetensors").write_bytes(pickle_path.read_bytes())
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(folder)


def test_truncated_or_modified_weights_are_refused(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was modified"):
        load_model(folder)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError):
        load_model(folder)
    weights.write_bytes(bytes(data[:100]))  # cut inside its header: it said "not a safetensors file; pickle ..."
    with pytest.raises(CheckpointError, match="is truncated: 100 bytes"):
        load_model(folder)


def test_metadata_without_a_checksum_is_refused(saved):
    _, folder = saved
    metadata = json.loads((folder / "model.json").read_text())
    del metadata["weights_sha256"]
    (folder / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="no weights checksum"):
        load_model(folder)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nothing-here")


@pytest.mark.parametrize("text, message", [(None, "no checkpoint metadata"), ("{not json", "is not valid JSON"),
                                           ("[1, 2]", "is not a JSON object")])
def test_missing_or_broken_metadata_is_a_checkpoint_error_naming_the_file(saved, text, message):
    _, folder = saved
    if text is None:
        (folder / "model.json").unlink()
    else:
        (folder / "model.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as raised:
        load_model(folder)
    assert "model.json" in str(raised.value)


def test_a_model_stored_under_a_name_like_a_weights_file_is_still_found_but_no_new_one_is_named_so(tmp_path):
    from stylecore.store import check_new_model_name
    from tasks.models import load_model_from, model_location, save_model_to
    from tasks.storage import Location

    store = Location(str(tmp_path / "store"))
    save_model_to(store.child("models/old.safetensors"), UNet(UNetConfig(base_channels=4, depth=2)).eval(), {})
    model, _ = load_model_from(model_location("old.safetensors", store.url))
    assert model.config.base_channels == 4
    with pytest.raises(ValueError, match="must not end in .safetensors"):
        check_new_model_name("new.safetensors")
