"""VGG weights: read from files or torchvision, frozen, with layers and normalisation taken from the weights."""

import json

import pytest
import torch

from stylecore.losses import LossConfig, resolve_layers
from stylecore.vgg import VGGFeatures, VGGWeightsError, load_vgg
from tests.conftest import write_vgg_file


def test_truncated_vgg19_offers_only_its_layers_and_picks_the_best_four(vgg_weights):
    _, source = load_vgg(vgg_weights)
    assert source.arch == "vgg19"
    assert source.available_layers() == ["relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1"]
    assert source.default_layers() == (["relu1_1", "relu2_1", "relu2_2", "relu3_1"], "relu3_1")


def test_full_depth_vgg16_defaults_to_the_seed_layers_with_content_at_the_fourth(tmp_path):
    path = write_vgg_file(tmp_path / "vgg16_to_relu4_3.safetensors", "D", 23)
    _, source = load_vgg(path)
    assert source.arch == "vgg16"
    assert source.default_layers() == (["relu1_2", "relu2_2", "relu3_3", "relu4_3"], "relu4_3")


def test_input_normalisation_comes_from_the_weights_description(tmp_path):
    path = write_vgg_file(tmp_path / "w.safetensors", "E", 12)
    (tmp_path / "w.json").write_text(json.dumps({"input": {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}}))
    features, source = load_vgg(path)
    assert source.mean == (0.1, 0.2, 0.3) and source.std == (0.5, 0.5, 0.5)
    vgg = VGGFeatures(features, source, ["relu1_1"])
    grey = torch.full((1, 3, 8, 8), 0.2)
    expected = features[:2]((grey - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5)
    assert torch.allclose(vgg(grey)["relu1_1"], expected)


def test_without_description_torchvision_imagenet_normalisation_is_used(tmp_path):
    _, source = load_vgg(write_vgg_file(tmp_path / "plain.safetensors", "E", 12))
    assert source.mean == (0.485, 0.456, 0.406)


def test_asking_for_a_layer_the_weights_lack_is_a_clear_error(vgg_weights):
    _, source = load_vgg(vgg_weights)
    with pytest.raises(VGGWeightsError, match=r"'relu4_3' is not in these weights.*available: relu1_1"):
        resolve_layers(source, LossConfig(style_layers=["relu1_2", "relu4_3"]))


def test_extractor_is_frozen_and_stays_in_eval_mode(vgg_weights):
    features, source = load_vgg(vgg_weights)
    vgg = VGGFeatures(features, source, ["relu1_1", "relu3_1"])
    vgg.train()
    assert not vgg.training
    assert all(not p.requires_grad for p in vgg.parameters())
    outputs = vgg(torch.rand(2, 3, 32, 32))
    assert set(outputs) == {"relu1_1", "relu3_1"}
    assert outputs["relu3_1"].shape == (2, 256, 8, 8)


def test_unusable_weight_files_are_refused_clearly(tmp_path):
    with pytest.raises(VGGWeightsError, match="not found"):
        load_vgg(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(VGGWeightsError, match="is not VGG weights: neither a PyTorch state dict"):
        load_vgg(garbage)
    pickled = tmp_path / "module.pth"
    torch.save({"features": torch.nn.Conv2d(3, 4, 3)}, pickled)  # a module, not its state dict
    with pytest.raises(VGGWeightsError, match="holds more than tensors, and pickled objects are never loaded") as refused:
        load_vgg(pickled)
    assert "weights_only" not in str(refused.value)  # PyTorch's advice: run the pickle's code
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(VGGWeightsError, match="not a VGG features state dict"):
        load_vgg(wrong)


def test_a_style_image_needs_a_pixel_left_at_its_deepest_style_layer():
    from stylecore.vgg import style_image_problem

    # three poolings before relu4_x: 8 px is the least; relu3_1 needs 4; the image is shrunk to the style size first
    assert style_image_problem(256, 8, 256, ["relu1_2", "relu4_3"]) is None
    assert "short side is 7 px" in style_image_problem(256, 7, 256, ["relu1_2", "relu4_3"])
    assert style_image_problem(256, 4, 256, ["relu1_1", "relu3_1"]) is None
    assert "short side is 4 px" in style_image_problem(512, 8, 256, None)
