"""The UNet: any size in, same size out, in [0, 1]; no longest skip; no transposed convolutions; trainable end to end."""

import pytest
import torch
from torch import nn

from stylecore.model import UNet, UNetConfig


@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=8, depth=3)).eval()


@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (33, 20), (64, 64), (5, 97)])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_output_has_the_input_shape_and_is_an_image_in_unit_range(model, batch, height, width):
    images = torch.rand(batch, 3, height, width)
    with torch.no_grad():
        output = model(images)
    assert output.shape == images.shape
    assert output.min() >= 0 and output.max() <= 1


def test_longest_skip_is_absent_full_resolution_decoder_sees_only_upsampled_features(model):
    config = model.config
    assert model.up[0].skip_channels == 0
    # The full-resolution merge block takes only the upsampled features' channels: nothing is concatenated.
    assert model.up[0].merge[1].in_channels == config.channels(0)
    # Every shorter skip is present: the other levels concatenate their encoder features.
    for level in range(1, config.depth):
        assert model.up[level].merge[1].in_channels == 2 * config.channels(level)

    seen = []
    handle = model.up[0].merge.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    handle.remove()
    assert seen == [config.channels(0)]


def test_input_only_reaches_the_output_through_the_bottleneck_path():
    # With the longest skip gone, changing the stem's output changes the result only via down[0].
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, depth=2)).eval()
    consumers = [name for name, module in net.named_modules() if module is net.stem]
    assert consumers == ["stem"]
    calls = []
    net.down[0].register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[1]))
    with torch.no_grad():
        net(torch.rand(1, 3, 16, 16))
    assert calls == [8]


def test_upsampling_uses_resize_convolution_not_transposed_convolution(model):
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_gradients_reach_every_parameter(norm):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, depth=2, norm=norm)).train()
    images = torch.rand(2, 3, 24, 40)
    (net(images) - images).pow(2).mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_invalid_configuration_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="norm must be one of"):
        UNetConfig(norm="layer")
    with pytest.raises(ValueError, match="depth"):
        UNetConfig(depth=0)


def test_norm_levels_leaves_the_deeper_levels_unnormalised():
    def instance_norms(config: UNetConfig) -> int:
        return sum(isinstance(m, torch.nn.InstanceNorm2d) for m in UNet(config).modules())

    everywhere = instance_norms(UNetConfig(base_channels=4, depth=3, norm_levels=None))
    assert instance_norms(UNetConfig(base_channels=4, depth=3, norm_levels=4)) == everywhere
    assert 0 < instance_norms(UNetConfig(base_channels=4, depth=3, norm_levels=2)) < everywhere
    assert instance_norms(UNetConfig(base_channels=4, depth=3, norm_levels=0)) == 0
    with pytest.raises(ValueError):
        UNetConfig(depth=3, norm_levels=-1)


@pytest.mark.parametrize("level", [1, 3])  # a decoder level, and the bottleneck (level == depth)
def test_residual_blocks_at_a_level_keep_shapes_and_all_train(level):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=3, res_blocks=2, res_level=level)).train()
    out = net(torch.rand(2, 3, 24, 40))
    assert out.shape == (2, 3, 24, 40)
    out.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.residual.parameters())
    with pytest.raises(ValueError, match="res_level"):
        UNetConfig(depth=3, res_blocks=1, res_level=4)


def test_checkpoints_written_before_a_field_existed_keep_their_architecture():
    old = {"base_channels": 8, "depth": 2, "norm": "instance", "max_channels": 256}  # no norm_levels & co.
    config = UNetConfig.from_dict(old)
    assert config.norm_levels is None and config.first_skip_level == 1 and config.res_blocks == 0
