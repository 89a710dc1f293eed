"""Images too large for one forward pass are stylised in tiles, and the tiles give the picture one pass gives:
no seams, no change of look, whatever the memory budget."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stylecore.engine import EngineConfig, Job, StylizeEngine, available_memory, container_headroom, cpu_batch_pixels
from stylecore.images import decode_image, encode_image, image_to_tensor
from stylecore.model import UNet, UNetConfig
from stylecore.stylize import stylize_batch
from stylecore.tiling import split_into_tiles, stylize_tiled

from conftest import ASSETS


def photo(width: int, height: int) -> torch.Tensor:
    image = Image.open(ASSETS / "photos" / "astronaut.jpg").convert("RGB").resize((width, height))
    return image_to_tensor(image)


def distinct_model(config: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose norm layers' scales and shifts differ from their defaults, so statistics matter."""
    torch.manual_seed(seed)
    model = UNet(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("config", [
    UNetConfig(base_channels=4),
    UNetConfig(base_channels=4, depth=3, norm_levels=None),
    UNetConfig(base_channels=4, norm="group"),
    UNetConfig(base_channels=4, norm="batch"),
    UNetConfig(base_channels=4, res_blocks=2, res_level=1),
    UNetConfig(base_channels=4, depth=3, first_skip_level=2),
], ids=["default", "depth3-all-normed", "group-norm", "batch-norm", "res-blocks", "fewer-skips"])
def test_tiles_give_the_one_pass_picture(config):
    model = distinct_model(config)
    image = photo(211, 173)  # sides that are no multiple of the stride
    whole = stylize_batch(model, image.unsqueeze(0))[0]
    tiled = stylize_tiled(model, image, max_pixels=110 * 110)
    assert len(list(split_into_tiles(173, 211, 110 * 110, 32, model.stride))) > 1
    difference = (tiled.int() - whole.int()).abs()
    assert difference.max() <= 1  # float rounding only
    assert (difference > 0).float().mean() < 0.001


@pytest.mark.parametrize("width, height", [(900, 6), (7, 700), (300, 9)])
def test_thin_images_too(width, height):
    model = distinct_model(UNetConfig(base_channels=4))
    image = photo(width, height)
    whole = stylize_batch(model, image.unsqueeze(0))[0]
    tiled = stylize_tiled(model, image, max_pixels=64 * 64)
    assert (tiled.int() - whole.int()).abs().max() <= 1


def test_tiles_normalised_on_their_own_would_not_match():
    """What the shared statistics are for: the same tiles with each tile's own instance-norm statistics differ."""
    model = distinct_model(UNetConfig(base_channels=4))
    image = photo(211, 173)
    whole = stylize_batch(model, image.unsqueeze(0))[0]
    independent = torch.empty_like(whole)
    for tile in split_into_tiles(173, 211, 110 * 110, 32, model.stride):
        result = stylize_batch(model, tile.of(image))[0]
        independent[:, tile.top : tile.bottom, tile.left : tile.right] = result[:, tile.core_rows, tile.core_columns]
    assert (independent.int() - whole.int()).abs().float().mean() > 2


def test_the_model_itself_is_left_untouched():
    model = distinct_model(UNetConfig(base_channels=4))
    image = photo(150, 120)
    before = stylize_batch(model, image.unsqueeze(0))
    stylize_tiled(model, image, max_pixels=90 * 90)
    assert torch.equal(stylize_batch(model, image.unsqueeze(0)), before)
    assert any(isinstance(module, torch.nn.InstanceNorm2d) for module in model.modules())


def png(image: torch.Tensor) -> bytes:
    return encode_image(Image.fromarray(image.permute(1, 2, 0).numpy()), "PNG")


def test_the_engine_tiles_an_image_over_its_pixel_budget_and_gives_the_same_picture():
    model = distinct_model(UNetConfig(base_channels=4))
    large, small = photo(400, 300), photo(64, 48)
    config = EngineConfig(max_batch_pixels=256 * 256, output_format="png")
    with StylizeEngine({"m": model}, "cpu", config) as engine:
        outcomes = list(engine.run([Job(0, png(large), ("m",)), Job(1, png(small), ("m",))]))
    for image, outcome in zip([large, small], outcomes):
        assert outcome.error is None
        expected = stylize_batch(model, image.unsqueeze(0))[0]
        assert (image_to_tensor(decode_image(outcome.outputs["m"])).int() - expected.int()).abs().max() <= 1


class MemoryLimitedUNet(UNet):
    """A UNet on a device with room for ``largest_input`` pixels: larger inputs fail as the CPU allocator does."""

    def __init__(self, largest_input: int):
        super().__init__(UNetConfig(base_channels=4))
        self.largest_input = largest_input

    def forward(self, images):
        pixels = images.shape[-2] * images.shape[-1]
        if pixels > self.largest_input:
            raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               f"you tried to allocate {pixels * 4096} bytes. Error code 12 (Cannot allocate memory)")
        return super().forward(images)


def test_an_image_too_large_for_memory_alone_is_stylised_in_smaller_tiles():
    torch.manual_seed(0)
    model = MemoryLimitedUNet(largest_input=100_000).eval()
    image = photo(480, 360)  # 172,800 pixels: fails whole, and in tiles of half that
    with StylizeEngine({"m": model}, "cpu", EngineConfig(output_format="png")) as engine:
        [outcome] = list(engine.run([Job(0, png(image), ("m",))]))
        assert engine.max_batch_pixels <= 100_000  # later images are cut to what fitted
    assert outcome.error is None
    reference = UNet(model.config).eval()
    reference.load_state_dict(model.state_dict())
    expected = stylize_batch(reference, image.unsqueeze(0))[0]
    assert (image_to_tensor(decode_image(outcome.outputs["m"])).int() - expected.int()).abs().max() <= 1


def test_the_cpu_pixel_budget_is_a_quarter_of_free_memory_at_the_models_bytes_per_pixel():
    available = available_memory()
    assert available is not None and available > 0  # Linux: /proc/meminfo, or the container's cgroup limit
    narrow, wide = UNet(UNetConfig(base_channels=8)), UNet(UNetConfig(base_channels=32))
    assert cpu_batch_pixels(wide) < cpu_batch_pixels(narrow)
    expected = available / 4 / (40 * 16 + 100)
    assert 0.8 * expected < cpu_batch_pixels(UNet()) < 1.2 * expected


GIB = 1024**3


def cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_containers_memory_limit_counts_its_page_cache_as_free_once_it_is_inactive(tmp_path):
    # 8 GiB limit, 7.5 GiB in use of which 5 GiB is page cache not recently used (images read earlier): 5.5 GiB
    # left, not 0.5, on both cgroup versions.
    v2 = cgroup(tmp_path / "v2", {"memory.max": f"{8 * GIB}\n", "memory.current": f"{15 * GIB // 2}\n",
                                  "memory.stat": f"anon {2 * GIB}\nactive_file 0\ninactive_file {5 * GIB}\n"})
    v1 = cgroup(tmp_path / "v1", {"memory/memory.limit_in_bytes": f"{8 * GIB}\n",
                                  "memory/memory.usage_in_bytes": f"{15 * GIB // 2}\n",
                                  "memory/memory.stat": f"inactive_file 4096\ntotal_inactive_file {5 * GIB}\n"})
    assert container_headroom(v2) == container_headroom(v1) == 11 * GIB // 2
    assert available_memory(v2) == min(available_memory(tmp_path / "none"), 11 * GIB // 2)


def test_no_container_limit_leaves_the_systems_free_memory(tmp_path):
    unlimited_v2 = cgroup(tmp_path / "v2", {"memory.max": "max\n", "memory.current": "123\n"})
    unlimited_v1 = cgroup(tmp_path / "v1", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                            "memory/memory.usage_in_bytes": "123\n"})
    without_stat = cgroup(tmp_path / "nostat", {"memory.max": f"{GIB}\n", "memory.current": f"{GIB // 4}\n"})
    assert container_headroom(unlimited_v2) is None and container_headroom(unlimited_v1) is None
    assert container_headroom(tmp_path / "missing") is None
    assert container_headroom(without_stat) == 3 * GIB // 4  # usage counted whole when it cannot be split


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_tiles_match_one_pass_up_to_bf16_rounding():
    model = distinct_model(UNetConfig()).cuda()
    image = photo(1000, 700).cuda()
    whole = stylize_batch(model, image.unsqueeze(0))[0]
    tiled = stylize_tiled(model, image, max_pixels=300 * 300)
    difference = (tiled.int() - whole.int()).abs().float()
    assert difference.mean() < 1.0 and difference.max() <= 16
