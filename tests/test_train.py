"""Priming and style training: losses go down, runs are reproducible, and an interrupted run resumes exactly."""

import shutil

import pytest
import torch

from stylecore.images import image_to_tensor
from stylecore.losses import LossConfig, PerceptualLoss, StyleTarget, layers_needed
from stylecore.model import UNet, UNetConfig
from stylecore.train import TrainConfig, TrainingDiverged, TrainingPhotos, prime_autoencoder, train_style
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


def test_a_loss_that_stops_being_a_number_stops_the_training_instead_of_ending_in_a_model_of_nans(
        small_pil_photos, perceptual_loss):
    perceptual_loss.config.style_weight = float("nan")  # a weight no caller checked
    config = TrainConfig(image_size=32, batch_size=2, steps=20, log_every=5)
    with pytest.raises(TrainingDiverged, match="the loss became nan by step 5"):
        train_style(small_pil_photos, UNet(MODEL).eval(), perceptual_loss, config)


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


def test_losses_logged_after_a_resume_are_those_of_an_uninterrupted_run(small_pil_photos, tmp_path):
    # The checkpoint at step 3 falls inside the log interval (2, 4]: step 3's loss must still count in it.
    config = TrainConfig(image_size=32, batch_size=2, steps=8, checkpoint_every=3, log_every=2, seed=5)
    uninterrupted = prime_autoencoder(small_pil_photos, MODEL, config)

    def crash_at_step_5(step, total, losses):
        if step == 5:
            raise Interrupt()

    with pytest.raises(Interrupt):
        prime_autoencoder(small_pil_photos, MODEL, config, on_step=crash_at_step_5, state_dir=tmp_path / "state")
    resumed = prime_autoencoder(small_pil_photos, MODEL, config, state_dir=tmp_path / "state")
    assert resumed.resumed_from == 3
    for want, got in zip(uninterrupted.history, resumed.history, strict=True):
        assert got["step"] == want["step"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_a_run_killed_while_saving_its_state_resumes_from_the_checkpoint_before(small_pil_photos, tmp_path):
    config = TrainConfig(image_size=32, batch_size=2, steps=6, checkpoint_every=2, seed=5)
    state_dir, at_step_2 = tmp_path / "state", tmp_path / "at-step-2"
    uninterrupted = prime_autoencoder(small_pil_photos, MODEL, config)

    def crash_at_step_5(step, total, losses):
        if step == 3:
            shutil.copytree(state_dir, at_step_2)
        if step == 5:
            raise Interrupt()

    with pytest.raises(Interrupt):
        prime_autoencoder(small_pil_photos, MODEL, config, on_step=crash_at_step_5, state_dir=state_dir)
    # killed between the two writes of the step-4 checkpoint: its tensors written beside the step-2 state
    [step_4_tensors] = state_dir.glob("state*.safetensors")
    shutil.copy(step_4_tensors, at_step_2)
    result = prime_autoencoder(small_pil_photos, MODEL, config, state_dir=at_step_2)
    assert result.resumed_from == 2 and result.steps == 6  # it started over from 0
    for want, got in zip(uninterrupted.history, result.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    garbled = tmp_path / "garbled"
    shutil.copytree(at_step_2, garbled)
    (garbled / "state.json").write_text('{"step": 4, "state_file": "../../elsewhere.safetensors"}')
    assert prime_autoencoder(small_pil_photos, MODEL, config, state_dir=garbled).resumed_from == 0


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


def test_saving_or_logging_more_or_less_often_still_resumes_the_run(small_pil_photos, tmp_path):
    state_dir = tmp_path / "state"
    first = TrainConfig(image_size=32, batch_size=2, steps=4, checkpoint_every=2, log_every=1)

    def stop(step, total, losses):
        if step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        prime_autoencoder(small_pil_photos, MODEL, first, on_step=stop, state_dir=state_dir)
    other = TrainConfig(image_size=32, batch_size=2, steps=4, checkpoint_every=1000, log_every=2)
    assert prime_autoencoder(small_pil_photos, MODEL, other, state_dir=state_dir).resumed_from == 2


def test_a_sliver_photo_is_trained_on_by_its_middle_not_scaled_up_whole():
    from PIL import Image

    photos = TrainingPhotos([Image.new("RGB", (1, 20_000), "red"), Image.new("RGB", (120, 80), "blue")], 32)
    assert [tuple(t.shape) for t in photos.tensors] == [(3, 128, 32), (3, 32, 48)]


def test_an_interrupted_style_run_is_resumed_only_by_a_run_of_the_same_style(small_pil_photos, vgg_weights, tmp_path):
    from PIL import Image

    from conftest import ASSETS
    from stylecore.recipes import run_style_training

    features, source = load_vgg(vgg_weights)
    config = LossConfig()
    vgg = VGGFeatures(features, source, layers_needed(source, config))
    styles = {"swirls": Image.open(ASSETS / "style_swirls.jpg").convert("RGB"),
              "flat": Image.new("RGB", (64, 64), (200, 40, 40))}
    train = TrainConfig(image_size=32, batch_size=2, steps=6, checkpoint_every=2)
    torch.manual_seed(0)
    primed = UNet(MODEL).eval()

    def run(style: str, on_step=None):
        return run_style_training("x", small_pil_photos, "photos", styles[style], style, style, 64, primed, {}, vgg,
                                  config, train, on_step=on_step, state_dir=tmp_path / "state")[1]

    def stop(step, total, losses):
        if step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run("swirls", stop)
    assert run("flat")["resumed_from_step"] == 0  # another painting under the same name starts afresh
    with pytest.raises(Interrupt):
        run("swirls", stop)
    assert run("swirls")["resumed_from_step"] == 2


def test_epochs_translate_to_steps_over_the_photo_set():
    assert TrainConfig(batch_size=8, epochs=2).total_steps(20) == 6
    assert TrainConfig(batch_size=8, steps=5).total_steps(1000) == 5
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(steps=3, epochs=1)


def test_a_photo_set_with_a_file_name_that_is_not_utf8_has_its_own_stable_fingerprint():
    import os

    from stylecore.recipes import photos_fingerprint

    latin1, utf8 = os.fsdecode(b"caf\xe9.jpg"), "café.jpg"  # the same name, in Latin-1 and in UTF-8 bytes
    assert photos_fingerprint([(latin1, b"x")]) == photos_fingerprint([(latin1, b"x")])
    assert photos_fingerprint([(latin1, b"x")]) != photos_fingerprint([(utf8, b"x")])
