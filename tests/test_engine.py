"""The stylisation engine: every input gets exactly one outcome, in input order; bad bytes become errors with a
reason; outputs are the model's pixels whatever the batching; on a GPU the nvjpeg path gives the same pictures."""

import io
import sys
import warnings

import pytest
import torch
from PIL import Image

from stylecore import engine as engine_module
from stylecore.engine import EncodeSplit, EngineConfig, Job, StylizeEngine
from stylecore.images import (
    ImageDecodeError, decode_image, decode_plain_jpeg, encode_image, image_to_tensor, jpeg_ends_complete,
    tensor_to_image,
)
from stylecore.model import UNet, UNetConfig
from stylecore.stylize import stylize_batch
from tests.test_images import ADOBE_GAMMA, ADOBE_RGB, matrix_profile


def tiny_model(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(base_channels=4, depth=2)).eval()


def encoded(size: tuple[int, int], fmt: str = "JPEG", seed: int = 0, **save) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, fmt, **save)
    return buffer.getvalue()


def luma(image: torch.Tensor) -> torch.Tensor:
    red, green, blue = image.float()
    return 0.299 * red + 0.587 * green + 0.114 * blue


def run(engine: StylizeEngine, datas: list[bytes], models=("m",)) -> list:
    return list(engine.run(Job(index, data, tuple(models)) for index, data in enumerate(datas)))


def test_every_input_gets_one_outcome_in_order_and_bad_bytes_say_why():
    datas = [encoded((20, 14)), b"", b"<html>not an image</html>", encoded((33, 17), "PNG"),
             encoded((20, 14))[:400], encoded((8, 8), "WEBP"), encoded((20, 14), seed=1)]
    with StylizeEngine({"m": tiny_model()}, "cpu", EngineConfig(batch_size=2)) as engine:
        outcomes = run(engine, datas)
    assert [o.tag for o in outcomes] == list(range(len(datas)))
    errors = {o.tag: o.error for o in outcomes if o.error}
    assert set(errors) == {1, 2, 4}
    assert "empty" in errors[1] and "not a recognised image" in errors[2] and "truncated" in errors[4].lower()
    for outcome in outcomes:
        if outcome.error is None:
            assert decode_image(outcome.outputs["m"]).size == (outcome.width, outcome.height)


def test_outputs_are_the_models_pixels_whatever_the_batching():
    model = tiny_model()
    datas = [encoded(size, "PNG", seed=i) for i, size in enumerate([(20, 14), (31, 9), (20, 14), (16, 16), (20, 14)])]
    configs = [EngineConfig(batch_size=1, output_format="png"), EngineConfig(batch_size=4, output_format="png"),
               EngineConfig(batch_size=64, max_batch_pixels=600, output_format="png")]
    for config in configs:
        with StylizeEngine({"m": model}, "cpu", config) as engine:
            outcomes = run(engine, datas)
        for data, outcome in zip(datas, outcomes):
            expected = stylize_batch(model, image_to_tensor(decode_image(data)).unsqueeze(0))[0]
            got = image_to_tensor(decode_image(outcome.outputs["m"]))
            assert (got.int() - expected.int()).abs().max() <= 1, config


def test_each_job_gets_only_the_models_it_asks_for():
    with StylizeEngine({"a": tiny_model(0), "b": tiny_model(1)}, "cpu", EngineConfig(batch_size=3)) as engine:
        outcomes = list(engine.run([Job(0, encoded((12, 12)), ("a",)), Job(1, encoded((12, 12)), ("a", "b")),
                                    Job(2, encoded((12, 12)), ("b",))]))
    assert [sorted(o.outputs) for o in outcomes] == [["a"], ["a", "b"], ["b"]]
    assert outcomes[1].outputs["a"] != outcomes[1].outputs["b"]


def test_a_job_can_choose_its_own_output_format():
    with StylizeEngine({"m": tiny_model()}, "cpu", EngineConfig(output_format="jpeg")) as engine:
        outcomes = list(engine.run([Job(0, encoded((12, 12)), ("m",)),
                                    Job(1, encoded((12, 12)), ("m",), output_format="png")]))
    assert Image.open(io.BytesIO(outcomes[0].outputs["m"])).format == "JPEG"
    assert Image.open(io.BytesIO(outcomes[1].outputs["m"])).format == "PNG"


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    with StylizeEngine({"m": tiny_model()}, "cpu", EngineConfig(max_pixels=500)) as engine:
        small, large = run(engine, [encoded((20, 20)), encoded((30, 30))])
    assert small.error is None
    assert "900 pixels, over the limit of 500" in large.error


def test_a_failing_input_stream_raises_after_the_outcomes_before_it():
    def jobs():
        for index in range(5):
            yield Job(index, encoded((12, 12), seed=index), ("m",))
        raise OSError("storage went away")

    seen = []
    with StylizeEngine({"m": tiny_model()}, "cpu", EngineConfig(batch_size=2)) as engine:
        with pytest.raises(OSError, match="storage went away"):
            for outcome in engine.run(jobs()):
                seen.append(outcome.tag)
    assert seen == [0, 1, 2, 3, 4]


def test_stopping_early_leaves_no_threads_running():
    import threading

    before = threading.active_count()
    with StylizeEngine({"m": tiny_model()}, "cpu", EngineConfig(batch_size=1)) as engine:
        outcomes = engine.run(Job(i, encoded((12, 12)), ("m",)) for i in range(50))
        next(outcomes)
        outcomes.close()
    assert threading.active_count() == before


def test_bad_settings_are_refused():
    for bad in ({"output_format": "gif"}, {"quality": 0}, {"batch_size": -1}, {"max_pixels": 0}):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


def test_plain_jpegs_decode_to_the_same_pixels_as_every_other_image_and_broken_ones_say_why():
    photo = Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 60).convert("RGB")
    for options in ({}, {"progressive": True}, {"subsampling": "4:4:4"}):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90, **options)
        data = buffer.getvalue()
        assert torch.equal(decode_plain_jpeg(data), image_to_tensor(decode_image(data)))
        with pytest.raises(ImageDecodeError, match="truncated"):
            decode_plain_jpeg(data[: len(data) // 2])


def test_only_jpegs_that_end_whole_are_left_to_the_gpu_decoder():
    # nvjpeg decodes a cut-off JPEG without complaint (grey below the cut), so those go to the CPU path, which
    # says "truncated"; a JPEG with a few padding bytes after its end is whole.
    photo = Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 60).convert("RGB")
    for options in ({}, {"progressive": True}):
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90, **options)
        data = buffer.getvalue()
        assert jpeg_ends_complete(data) and jpeg_ends_complete(data + bytes(16))
        assert not any(jpeg_ends_complete(data[:cut]) for cut in range(100, len(data) - 1))


def test_outputs_come_to_the_host_with_their_own_pixels_whatever_their_sizes():
    # on a GPU the outputs of a batch are copied back one stack per image size, then handed out per image
    outputs = {(index, name): torch.randint(0, 256, (3, 8 + 4 * (index % 3), 12), dtype=torch.uint8)
               for index in range(7) for name in ("a", "b")}
    host = engine_module._to_host(outputs)
    assert host.keys() == outputs.keys()
    assert all(torch.equal(host[key], outputs[key]) for key in outputs)


def adobe_rgb_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 60).convert("RGB").save(
        buffer, "JPEG", quality=95, icc_profile=matrix_profile("Adobe RGB (1998) compatible", ADOBE_RGB, ADOBE_GAMMA))
    return buffer.getvalue()


def test_a_jpeg_with_a_wide_gamut_profile_is_stylised_in_srgb_like_any_other_image():
    # Plain JPEGs take faster decoders (libjpeg-turbo, nvjpeg) that know nothing of ICC profiles: not a tagged one.
    tagged = adobe_rgb_jpeg()
    as_srgb = encode_image(decode_image(tagged), "png")
    with StylizeEngine({"m": tiny_model()}, "cpu", EngineConfig(output_format="png")) as engine:
        outputs = [image_to_tensor(decode_image(o.outputs["m"])) for o in run(engine, [tagged, as_srgb])]
    assert torch.equal(outputs[0], outputs[1])


def test_jpeg_outputs_are_the_pictures_the_model_made():
    model = tiny_model()
    buffer = io.BytesIO()
    Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 60).convert("RGB").save(buffer, "PNG")
    with StylizeEngine({"m": model}, "cpu", EngineConfig(output_format="jpeg", quality=95)) as engine:
        jpeg = run(engine, [buffer.getvalue()])[0]
    with StylizeEngine({"m": model}, "cpu", EngineConfig(output_format="png")) as engine:
        png = run(engine, [buffer.getvalue()])[0]
    made = decode_image(png.outputs["m"])
    as_pil_saves_it = image_to_tensor(decode_image(encode_image(made, "jpeg", 95))).float()
    assert (image_to_tensor(decode_image(jpeg.outputs["m"])).float() - as_pil_saves_it).abs().mean() < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_between_outcomes_the_callers_thread_is_back_on_its_own_cuda_stream():
    streams = []
    with StylizeEngine({"m": tiny_model().cuda()}, "cuda", EngineConfig(batch_size=2)) as engine:
        for _ in engine.run(Job(i, encoded((32, 32), seed=i), ("m",)) for i in range(5)):
            streams.append(torch.cuda.current_stream())
    assert streams and all(stream == torch.cuda.default_stream() for stream in streams)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_codec_gives_the_same_pictures_as_the_cpu_path():
    model = tiny_model()
    photo = Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 60).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: must come out upright
    photo.save(rotated, "JPEG", quality=95, exif=exif)
    datas = [buffer.getvalue(), rotated.getvalue(), encoded((40, 24), "PNG"), b"garbage"]
    results = {}
    for gpu_codec in (False, True):
        with StylizeEngine({"m": model}, "cuda", EngineConfig(gpu_codec=gpu_codec, output_format="jpeg")) as engine:
            results[gpu_codec] = run(engine, datas)
    for cpu, gpu in zip(results[False], results[True]):
        assert (cpu.error is None) == (gpu.error is None)
        assert (cpu.width, cpu.height) == (gpu.width, gpu.height)
        if cpu.error is None:  # nvjpeg keeps full chroma (4:4:4), libjpeg halves it (4:2:0): compare brightness
            a, b = (luma(image_to_tensor(decode_image(outcome.outputs["m"]))) for outcome in (cpu, gpu))
            assert (a - b).abs().mean() < 2.0
    assert (results[True][1].width, results[True][1].height) == (64, 96)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_gives_the_pictures_of_the_cpu_decode_and_broken_jpegs_still_say_why():
    model = tiny_model()
    jpegs = []
    for quality, options in ((95, {}), (80, {"progressive": True}), (90, {"subsampling": "4:4:4"})):
        buffer = io.BytesIO()
        Image.effect_mandelbrot((96, 64), (-2, -1, 1, quality / 50), 60).convert("RGB").save(buffer, "JPEG",
                                                                                            quality=quality, **options)
        jpegs.append(buffer.getvalue())
    datas = [*jpegs, jpegs[0][: len(jpegs[0]) // 2], encoded((40, 24), "PNG"), b"garbage", adobe_rgb_jpeg()]
    results = {}
    for gpu_decode in (False, True):
        config = EngineConfig(gpu_decode=gpu_decode, gpu_codec=False, output_format="png")
        with StylizeEngine({"m": model}, "cuda", config) as engine:
            results[gpu_decode] = run(engine, datas)
    for cpu, gpu in zip(results[False], results[True]):
        assert (cpu.error is None) == (gpu.error is None), (cpu.error, gpu.error)
        assert (cpu.width, cpu.height) == (gpu.width, gpu.height)
        if cpu.error is None:  # nvjpeg's and libjpeg-turbo's inverse DCTs round differently
            a, b = (image_to_tensor(decode_image(outcome.outputs["m"])).float() for outcome in (cpu, gpu))
            assert (a - b).abs().mean() < 2.0
    assert "truncated" in results[True][3].error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_outputs_encoded_on_the_cpu_from_a_gpu_are_the_finished_pictures():
    # PNG is lossless: each output must equal the model's own output for that photo, however the copies from the
    # GPU and the encoder threads interleave with the next batch's forward pass.
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=32)).cuda().eval()
    generator = torch.Generator().manual_seed(0)
    photos = [torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8, generator=generator) for _ in range(12)]
    expected = [stylize_batch(model, photo[None].cuda())[0].cpu() for photo in photos]
    datas = [encode_image(tensor_to_image(photo), "PNG", 90) for photo in photos]
    with StylizeEngine({"m": model}, "cuda", EngineConfig(output_format="png", batch_size=4)) as engine:
        outcomes = run(engine, datas)
    for outcome, want in zip(outcomes, expected):
        got = image_to_tensor(decode_image(outcome.outputs["m"]))
        assert (got.int() - want.int()).abs().float().mean() < 1.0  # bf16 in other batch shapes: a level or so


def test_jpeg_encoding_moves_to_the_cpu_while_the_models_keep_the_gpu_busy():
    split = EncodeSplit()
    for _ in range(40):
        split.update((32, 0.010), (32, 0.020), waited_for="models")
    assert split.on_gpu(64) == round(64 * EncodeSplit.MIN_SHARE)  # a few stay on nvjpeg: its rate stays known
    assert split.on_gpu(1) == 0


def test_jpeg_encoding_moves_to_the_gpu_while_reading_or_decoding_is_the_slower():
    split = EncodeSplit()
    for _ in range(40):
        split.update((32, 0.010), (32, 0.020), waited_for="input")
    assert split.on_gpu(100) == round(100 * (1 - EncodeSplit.MIN_SHARE))


def test_when_the_encoding_is_the_slower_the_split_finishes_both_sides_together():
    # nvjpeg encodes 3,000 img/s, the CPU threads 1,000 whatever the split: both finish together at a 3:1 split
    split = EncodeSplit()
    for _ in range(60):
        on_gpu = split.on_gpu(64)
        split.update((on_gpu, on_gpu / 3000), (64 - on_gpu, (64 - on_gpu) / 1000), waited_for="nothing")
    assert split.on_gpu(64) == 48
    assert split.gpu_rate == pytest.approx(3000) and split.cpu_rate == pytest.approx(1000)


def test_a_side_with_nothing_to_do_keeps_its_rate_and_the_first_batch_sets_none():
    split = EncodeSplit()
    split.update((32, 1.0), (32, 2.0), waited_for="nothing")  # the first batch: nvjpeg's and the pool's start
    assert split.gpu_rate is None and split.cpu_rate is None
    split.update((32, 0.01), (32, 0.02), waited_for="nothing")
    split.update((0, 0.0), (64, 0.04), waited_for="nothing")
    assert split.gpu_rate == pytest.approx(3200) and split.cpu_rate == pytest.approx(1600)


def test_a_fixed_share_stays_fixed():
    for share in (0.0, 0.25, 1.0):
        split = EncodeSplit(fixed=share)
        for waited_for in ("models", "input", "nothing") * 5:
            split.update((10, 0.01), (10, 0.01), waited_for)
        assert split.on_gpu(8) == round(8 * share)
    with pytest.raises(ValueError, match="gpu_encode_share"):
        EngineConfig(gpu_encode_share=1.5)


def test_each_output_gets_its_own_bytes_whichever_side_of_the_split_encoded_it():
    # On a CPU, the engine's batched encode call (nvjpeg's on a GPU) runs torchvision's CPU encoder: the same
    # bytes as the threads' one-by-one encodes, so any mix-up between the two sides' outputs shows.
    model = tiny_model()
    photos = [encoded((48 + 8 * (index % 3), 40), seed=index) for index in range(11)]
    with StylizeEngine({"m": model, "n": tiny_model(1)}, "cpu", EngineConfig(batch_size=4)) as engine:
        expected = run(engine, photos, models=("m", "n"))
    for share in (0.3, 0.5, 1.0):
        with StylizeEngine({"m": model, "n": tiny_model(1)}, "cpu", EngineConfig(batch_size=4)) as engine:
            engine.gpu_jpeg, engine.encode_split = True, EncodeSplit(fixed=share)
            outcomes = run(engine, photos, models=("m", "n"))
        assert [outcome.tag for outcome in outcomes] == list(range(11))
        assert [outcome.outputs for outcome in outcomes] == [outcome.outputs for outcome in expected]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_jpeg_outputs_split_between_nvjpeg_and_the_cpu_are_the_same_pictures_in_input_order():
    model = tiny_model()
    photos = []
    for index in range(10):
        buffer = io.BytesIO()
        Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1 + index / 10), 60).convert("RGB").save(buffer, "JPEG",
                                                                                              quality=95)
        photos.append(buffer.getvalue())
    results = {}
    for share in (0.0, 0.5, 1.0, None):
        config = EngineConfig(gpu_encode_share=share, batch_size=4, output_format="jpeg")
        with StylizeEngine({"m": model}, "cuda", config) as engine:
            results[share] = run(engine, photos)
            if share is None:  # three batches: the split measured both sides
                assert engine.encode_split.gpu_rate and engine.encode_split.cpu_rate
    for outcomes in results.values():
        assert [outcome.tag for outcome in outcomes] == list(range(10))
        assert all(outcome.error is None for outcome in outcomes)
    for index in range(10):  # nvjpeg keeps full chroma (4:4:4), libjpeg halves it (4:2:0): compare brightness
        pictures = [luma(image_to_tensor(decode_image(outcomes[index].outputs["m"]))) for outcomes in results.values()]
        assert all((picture - pictures[0]).abs().mean() < 2.0 for picture in pictures)


class RecordingSplit(EncodeSplit):
    """The engine's own split, keeping what held each batch's encoding up."""

    def __init__(self):
        super().__init__()
        self.held_up_by: list[str] = []

    def update(self, gpu, cpu, waited_for):
        self.held_up_by.append(waited_for)
        super().update(gpu, cpu, waited_for)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_split_tells_a_gpu_busy_with_the_models_from_input_that_comes_slowly():
    import time

    buffer = io.BytesIO()
    Image.effect_mandelbrot((1024, 1024), (-2, -1.5, 1, 1.5), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    photo = buffer.getvalue()
    torch.manual_seed(0)
    heavy = UNet(UNetConfig(base_channels=32)).cuda().eval()  # at 1024 px, batches of 8: far slower than launching

    def slowly(count: int):
        for index in range(count):
            if index % 4 == 0:
                time.sleep(0.1)  # a slow store: the models wait for every batch
            yield Job(index, photo, ("m",))

    cases = {"input": (tiny_model().cuda(), slowly(40), 4),
             "models": (heavy, (Job(index, photo, ("m",)) for index in range(96)), 8)}
    for expected, (model, jobs, batch_size) in cases.items():
        with StylizeEngine({"m": model}, "cuda", EngineConfig(batch_size=batch_size)) as engine:
            engine.encode_split = split = RecordingSplit()
            assert all(outcome.error is None for outcome in engine.run(jobs))
        later = split.held_up_by[3:]  # after the first batches (CUDA's and nvjpeg's start)
        assert later.count(expected) > len(later) / 2, (expected, split.held_up_by)


class IndexLimitedUNet(UNet):
    """A real UNet that, like some CUDA kernels, refuses a batch past a size (torch's own message)."""

    def __init__(self, largest_batch: int):
        torch.manual_seed(0)
        super().__init__(UNetConfig(base_channels=4, depth=2))
        self.largest_batch = largest_batch

    def forward(self, images):
        if len(images) > self.largest_batch:
            raise RuntimeError("input tensor must fit into 32-bit index math")
        return super().forward(images)


def test_a_batch_too_large_for_the_kernels_is_halved_and_later_batches_are_cut_smaller():
    model = IndexLimitedUNet(largest_batch=3).eval()
    datas = [encoded((16, 16), "PNG", seed=i) for i in range(20)]
    with StylizeEngine({"m": model}, "cpu", EngineConfig(batch_size=8, output_format="png")) as engine:
        outcomes = run(engine, datas)
        assert engine.batch_size <= 3
    assert all(o.error is None for o in outcomes)
    for data, outcome in zip(datas, outcomes):
        expected = stylize_batch(model, image_to_tensor(decode_image(data)).unsqueeze(0))[0]
        assert (image_to_tensor(decode_image(outcome.outputs["m"])).int() - expected.int()).abs().max() <= 1


class FailsOnceUNet(UNet):
    """A model whose first forward pass runs out of memory, as a GPU shared with other workers can once."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(UNetConfig(base_channels=4, depth=2))
        self.failed, self.batches = False, []

    def forward(self, images):
        if not self.failed:
            self.failed = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        self.batches.append(len(images))
        return super().forward(images)


def test_one_out_of_memory_on_a_small_image_does_not_shrink_every_later_batch_to_one_image():
    model = FailsOnceUNet().eval()
    with StylizeEngine({"m": model}, "cpu", EngineConfig(batch_size=8, output_format="png")) as engine:
        first = run(engine, [encoded((100, 100), "PNG")])
        model.batches.clear()
        later = run(engine, [encoded((64, 64), "PNG", seed=i) for i in range(16)])
    assert [o.error for o in first + later] == [None] * 17
    assert model.batches == [8, 8]


def test_other_model_errors_are_not_hidden():
    model = IndexLimitedUNet(largest_batch=0).eval()  # refuses everything, even one image
    with StylizeEngine({"m": model}, "cpu", EngineConfig(batch_size=4)) as engine:
        with pytest.raises(RuntimeError, match="32-bit index"):
            run(engine, [encoded((16, 16), seed=i) for i in range(4)])


def test_stylising_in_threads_leaves_the_process_warning_filters_as_they_were():
    # warnings.catch_warnings swaps one process-wide list: entered and left by threads at once, it can leave
    # "ignore every warning" behind for the rest of a long-lived process (a served flow). A tiny switch interval
    # makes the threads interleave inside such blocks, as they do now and then at the default one.
    previous = sys.getswitchinterval()
    datas = [encoded((12, 10), "PNG", seed=i) for i in range(8)] * 40 + [encoded((12, 10), seed=1)] * 80
    filters_before = list(warnings.filters)
    sys.setswitchinterval(1e-6)
    try:
        with StylizeEngine({"m": tiny_model()}, "cpu", EngineConfig(batch_size=16, cpu_threads=8)) as engine:
            outcomes = run(engine, datas)
    finally:
        sys.setswitchinterval(previous)
    assert all(outcome.error is None for outcome in outcomes)
    assert list(warnings.filters) == filters_before
