"""One forward pass over a batch; the engine's tests cover streams of mixed sizes."""

import torch

from stylecore.model import UNet, UNetConfig
from stylecore.stylize import stylize_batch


def test_float_input_in_unit_range_is_accepted():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, depth=2)).eval()
    assert stylize_batch(model, torch.rand(2, 3, 12, 12)).shape == (2, 3, 12, 12)
