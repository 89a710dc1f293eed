"""A model store at a URL (what the flows train into): replacing a model is one step for its readers. However a
replacement is cut off, the folder holds the old model or the new one, whole; and whatever a reader read first, it
loads one of the two, never new weights under old metadata."""

import json
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from stylecore.checkpoint import METADATA_FILE, CheckpointError, load_model, style_file_of
from stylecore.model import UNet, UNetConfig
from stylecore.store import ModelStore
from tasks.models import is_complete, load_model_from, save_model_to
from tasks.storage import Location, read_bytes, write_bytes


class CuttableStore(MemoryFileSystem):
    """A real in-memory filesystem whose writes of paths containing ``cut_at`` fail, as a killed trainer's would;
    ``before_read`` runs once before a read of a path containing its key (another process acting meanwhile)."""

    protocol = "cuttable"
    cut_at: str | None = None
    before_read: dict = {}

    def pipe_file(self, path, value, **kwargs):
        if CuttableStore.cut_at and CuttableStore.cut_at in path:
            raise OSError(f"cut off writing {path}")
        return super().pipe_file(path, value, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        for key in [key for key in CuttableStore.before_read if key in path]:
            CuttableStore.before_read.pop(key)()
        return super().cat_file(path, *args, **kwargs)


@pytest.fixture
def folder():
    fsspec.register_implementation("cuttable", CuttableStore, clobber=True)
    CuttableStore.cut_at, CuttableStore.before_read = None, {}
    yield Location(f"cuttable://{uuid.uuid4().hex[:8]}/models/swirls")
    CuttableStore.cut_at, CuttableStore.before_read = None, {}


def tiny_model(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(base_channels=4, depth=2)).eval()


def files_in(location: Location) -> list[str]:
    fs, path = location.filesystem()
    return sorted(name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False))


def test_a_replacement_cut_off_before_its_model_json_leaves_the_old_model_whole(folder):
    old = save_model_to(folder, tiny_model(1), {"name": "swirls", "version": "old"}, style_jpeg=b"old style")
    assert files_in(folder) == ["model.json", "model.safetensors", "style.jpg"]  # a first save: the usual names
    CuttableStore.cut_at = METADATA_FILE
    with pytest.raises(OSError, match="cut off"):
        save_model_to(folder, tiny_model(2), {"name": "swirls", "version": "new"}, style_jpeg=b"new style")
    _, metadata = load_model_from(folder)  # before, the new weights had replaced the old ones: a checksum failure
    assert metadata["version"] == "old" and metadata["weights_sha256"] == old["weights_sha256"]
    assert read_bytes(folder.child(style_file_of(metadata))) == b"old style"  # its own style image, not the new one

    CuttableStore.cut_at = None  # the same training run again
    new = save_model_to(folder, tiny_model(2), {"name": "swirls", "version": "new"}, style_jpeg=b"new style")
    _, metadata = load_model_from(folder)
    assert metadata["version"] == "new" and new["weights_file"] == f"model-{new['weights_sha256'][:16]}.safetensors"
    assert read_bytes(folder.child(style_file_of(metadata))) == b"new style"
    # the old files and the orphans of the cut-off attempt are gone
    assert files_in(folder) == sorted(["model.json", new["weights_file"], new["style_file"]])
    assert is_complete(folder)


def test_a_reader_that_read_the_old_model_json_just_before_a_replacement_loads_the_new_model(folder):
    save_model_to(folder, tiny_model(1), {"name": "swirls", "version": "old"})
    # between this reader's read of model.json and of the weights it names, another training replaces the model
    CuttableStore.before_read = {"model.safetensors": lambda: save_model_to(folder, tiny_model(2),
                                                                            {"name": "swirls", "version": "new"})}
    model, metadata = load_model_from(folder, device="cpu")
    assert metadata["version"] == "new" and not CuttableStore.before_read
    images = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(images), tiny_model(2)(images))


def test_a_replaced_model_copied_to_this_machine_loads_by_folder_and_by_weights_file_and_is_listed(tmp_path):
    store = Location(str(tmp_path / "home"))
    save_model_to(store.child("models/swirls"), tiny_model(1), {"name": "swirls"}, style_jpeg=b"old")
    replaced = save_model_to(store.child("models/swirls"), tiny_model(2), {"name": "swirls"}, style_jpeg=b"new")
    folder = tmp_path / "home" / "models" / "swirls"
    for path in (folder, folder / replaced["weights_file"]):
        _, metadata = load_model(path)
        assert metadata["weights_sha256"] == replaced["weights_sha256"]
        assert (folder / style_file_of(metadata)).read_bytes() == b"new"  # what eval measures against
    assert [name for name, metadata in ModelStore(tmp_path / "home").list() if "error" not in metadata] == ["swirls"]


def test_a_weights_file_named_outside_the_models_folder_is_refused(folder):
    document = save_model_to(folder, tiny_model(1), {"name": "swirls"})
    write_bytes(folder.child(METADATA_FILE), json.dumps({**document, "weights_file": "../other/x.safetensors"}).encode())
    with pytest.raises(CheckpointError, match="is not the name of a .safetensors file beside it"):
        load_model_from(folder)


def test_a_weights_file_stands_for_its_model_folder_only_under_this_project_s_names(tmp_path):
    from tasks.models import model_location

    assert model_location(str(tmp_path / "m" / "model.safetensors"), None).url == str(tmp_path / "m")
    assert model_location(f"gs://b/m/model-{'ab' * 8}.safetensors", None).url == "gs://b/m"
    # another model exported beside it, with its own JSON: not the folder's model.json (it loaded that one)
    assert model_location(str(tmp_path / "m" / "B.safetensors"), None).url == str(tmp_path / "m" / "B.safetensors")
