"""Priming and style training: losses go down, runs are reproducible, and an interrupted run resumes exactly."""

import pytest
import torch

from stylecore.images import image_to_tensor
from stylecore.losses import LossConfig, PerceptualLoss, StyleTarget, layers_needed
from stylecore.model import UNet, UNetConfig
from stylecore.train import TrainConfig, TrainingPhotos, prime_autoencoder, train_style
from stylecore.vgg import VGGFeatures, load_vgg

MODEL = UNetConfig(base_channels=8, depth=2)


def fixed_batch(photos, size=32):
    return TrainingPhotos(photos, size).sample(4, torch.Generator().manual_seed(123))


@pytest.fixture
def perceptual_loss(vgg_weights, style_image):
    features, source = load_vgg(vgg_weights)
    config = LossConfig()
    vgg = VGGFeatures(features, source, layers_needed(source, config))
    from PIL import Image

    style = image_to_tensor(Image.open(style_image).convert("RGB")).float() / 255
    return PerceptualLoss(vgg, config, StyleTarget.from_image(vgg, style, source.default_layers()[0]))


def test_priming_lowers_reconstruction_error(small_pil_photos):
    batch = fixed_batch(small_pil_photos)
    torch.manual_seed(0)
    untrained = UNet(MODEL).eval()
    config = TrainConfig(image_size=32, batch_size=4, steps=40, learning_rate=3e-3, log_every=5)
    result = prime_autoencoder(small_pil_photos, MODEL, config)
    with torch.no_grad():
        before = (untrained(batch) - batch).abs().mean()
        after = (result.model(batch) - batch).abs().mean()
    assert after < 0.7 * before
    assert result.steps == 40 and [h["step"] for h in result.history] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_priming_can_add_a_vgg_content_term(small_pil_photos, vgg_weights):
    features, source = load_vgg(vgg_weights)
    vgg = VGGFeatures(features, source, ["relu2_1"])
    config = TrainConfig(image_size=32, batch_size=2, steps=4, log_every=2)
    result = prime_autoencoder(small_pil_photos, MODEL, config, content_vgg=vgg, content_weight=0.1)
    assert {"reconstruction", "content"} <= set(result.history[-1])
    assert result.history[-1]["loss"] > result.history[-1]["reconstruction"]


def test_style_training_lowers_style_loss(small_pil_photos, perceptual_loss):
    batch = fixed_batch(small_pil_photos)
    torch.manual_seed(0)
    primed = UNet(MODEL).eval()
    config = TrainConfig(image_size=32, batch_size=4, steps=30, learning_rate=3e-3, log_every=10)
    result = train_style(small_pil_photos, primed, perceptual_loss, config)
    with torch.no_grad():
        before = perceptual_loss(primed(batch), batch)["style"]
        after = perceptual_loss(result.model(batch), batch)["style"]
    assert after < 0.8 * before
    assert set(result.history[-1]) >= {"step", "loss", "style", "content"}


def test_training_is_deterministic_given_a_seed(small_pil_photos):
    config = TrainConfig(image_size=32, batch_size=2, steps=5, seed=11)
    first = prime_autoencoder(small_pil_photos, MODEL, config).model.state_dict()
    second = prime_autoencoder(small_pil_photos, MODEL, config).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_last_checkpoint_and_ends_identically(small_pil_photos, tmp_path):
    config = TrainConfig(image_size=32, batch_size=2, steps=8, checkpoint_every=3, log_every=2, seed=5)
    uninterrupted = prime_autoencoder(small_pil_photos, MODEL, config).model.state_dict()

    def crash_at_step_7(step, total, losses):
        if step == 7:
            raise Interrupt()

    state_dir = tmp_path / "state"
    with pytest.raises(Interrupt):
        prime_autoencoder(small_pil_photos, MODEL, config, on_step=crash_at_step_7, state_dir=state_dir)
    assert (state_dir / "state.json").is_file()

    resumed = prime_autoencoder(small_pil_photos, MODEL, config, state_dir=state_dir)
    assert resumed.resumed_from == 6
    assert [h["step"] for h in resumed.history] == [2, 4, 6, 8]
    state = resumed.model.state_dict()
    for key in uninterrupted:
        assert torch.allclose(uninterrupted[key].float(), state[key].float(), atol=1e-6), key


def test_state_from_a_different_configuration_is_not_resumed(small_pil_photos, tmp_path):
    state_dir = tmp_path / "state"
    first = TrainConfig(image_size=32, batch_size=2, steps=4, checkpoint_every=2)

    def stop(step, total, losses):
        if step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        prime_autoencoder(small_pil_photos, MODEL, first, on_step=stop, state_dir=state_dir)
    other = TrainConfig(image_size=32, batch_size=2, steps=4, checkpoint_every=2, learning_rate=5e-4)
    assert prime_autoencoder(small_pil_photos, MODEL, other, state_dir=state_dir).resumed_from == 0


def test_epochs_translate_to_steps_over_the_photo_set():
    assert TrainConfig(batch_size=8, epochs=2).total_steps(20) == 6
    assert TrainConfig(batch_size=8, steps=5).total_steps(1000) == 5
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(steps=3, epochs=1)
