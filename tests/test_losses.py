"""Gram matrices, style, content and total-variation losses, checked against hand-computed values."""

import pytest
import torch

from stylecore.losses import (
    LossConfig,
    PerceptualLoss,
    StyleTarget,
    content_distance_per_image,
    gram_matrix,
    layers_needed,
    style_distance_per_image,
    total_variation,
)
from stylecore.vgg import VGGFeatures, load_vgg


@pytest.fixture(scope="module")
def vgg_and_source(vgg_weights):
    features, source = load_vgg(vgg_weights)
    return features, source


def test_gram_matrix_matches_hand_computation():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)  # C=2, H=1, W=2
    expected = torch.tensor([[1 + 4, 3 + 8], [3 + 8, 9 + 16]]) / (2 * 1 * 2)
    assert torch.allclose(gram_matrix(features)[0], expected)


def test_gram_matrix_is_independent_of_image_size_for_a_repeated_texture():
    tile = torch.rand(1, 4, 3, 3)
    assert torch.allclose(gram_matrix(tile), gram_matrix(tile.repeat(1, 1, 4, 4)), atol=1e-6)


def test_style_distance_is_weighted_mse_of_grams():
    output = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2),
              "b": torch.ones(1, 1, 1, 1)}
    target = StyleTarget(grams={"a": torch.zeros(2, 2), "b": torch.full((1, 1), 3.0)}, scales={"a": 2.0, "b": 4.0})
    # gram(a) = [[1,0],[0,1]] / 4 -> MSE to zeros = (2 * 1/16) / 4 = 1/32; gram(b) = 1 -> MSE to 3 = 4
    raw = style_distance_per_image(output, target, {"a": 1.0, "b": 3.0}, relative=False)
    assert torch.allclose(raw, torch.tensor([(1 / 32 + 3 * 4) / 4]))
    relative = style_distance_per_image(output, target, {"a": 1.0, "b": 3.0}, relative=True)
    assert torch.allclose(relative, torch.tensor([(1 / 32 / 2 + 3 * 4 / 4) / 4]))


def test_content_distance_is_zero_for_identical_features_and_mse_otherwise():
    features = torch.rand(2, 3, 4, 5)
    assert torch.all(content_distance_per_image(features, features.clone(), relative=True) == 0)
    shifted = features + 0.5
    assert torch.allclose(content_distance_per_image(shifted, features, relative=False), torch.full((2,), 0.25))


def test_total_variation_of_a_step_image():
    image = torch.zeros(1, 3, 2, 2)
    image[..., :, 1] = 1.0  # left column 0, right column 1
    # horizontal differences are all 1, vertical all 0
    assert torch.isclose(total_variation(image), torch.tensor(1.0))


def test_style_loss_is_zero_for_the_style_image_itself_at_any_batch_size(vgg_and_source):
    features, source = vgg_and_source
    config = LossConfig()
    vgg = VGGFeatures(features, source, layers_needed(source, config))
    torch.manual_seed(0)
    style = torch.rand(3, 40, 40)
    style_layers = config.style_layers or source.default_layers()[0]
    loss = PerceptualLoss(vgg, config, StyleTarget.from_image(vgg, style, style_layers))
    for batch in (1, 4):
        images = style.unsqueeze(0).repeat(batch, 1, 1, 1)
        result = loss(images, images)
        assert result["style"].item() == pytest.approx(0.0, abs=1e-6)
        assert result["content"].item() == pytest.approx(0.0, abs=1e-9)
    gradient = torch.linspace(0, 1, 40).view(1, 1, 1, 40).expand(2, 3, 40, 40).contiguous()
    assert loss(gradient, gradient)["style"].item() > 0.1


def test_loss_weights_come_from_the_config(vgg_and_source):
    features, source = vgg_and_source
    torch.manual_seed(1)
    style, photos, outputs = torch.rand(3, 32, 32), torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    terms = {}
    for name, config in {"base": LossConfig(style_weight=1, content_weight=1, tv_weight=1),
                         "scaled": LossConfig(style_weight=2, content_weight=3, tv_weight=5)}.items():
        vgg = VGGFeatures(features, source, layers_needed(source, config))
        target = StyleTarget.from_image(vgg, style, source.default_layers()[0])
        terms[name] = PerceptualLoss(vgg, config, target)(outputs, photos)
    base = terms["base"]
    expected = 2 * base["style"] + 3 * base["content"] + 5 * base["tv"]
    assert torch.isclose(terms["scaled"]["loss"], expected)
