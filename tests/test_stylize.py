"""Batched stylisation gives the same pixels as one image at a time, in input order, for mixed sizes."""

import torch

from stylecore.model import UNet, UNetConfig
from stylecore.stylize import stylize_batch, stylize_images


def test_mixed_sizes_come_back_in_order_with_their_own_sizes_and_match_single_image_results():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, depth=2)).eval()
    sizes = [(20, 30), (16, 16), (20, 30), (9, 41), (16, 16), (20, 30), (5, 5)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    outputs = list(stylize_images(model, iter(images), batch_size=2, window=2))
    assert [tuple(o.shape[-2:]) for o in outputs] == sizes
    assert all(o.dtype == torch.uint8 for o in outputs)
    for image, output in zip(images, outputs):
        single = stylize_batch(model, image.unsqueeze(0))[0]
        assert (single.int() - output.int()).abs().max() <= 1


def test_float_input_in_unit_range_is_accepted():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, depth=2)).eval()
    assert stylize_batch(model, torch.rand(2, 3, 12, 12)).shape == (2, 3, 12, 12)
