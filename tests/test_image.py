"""miniblip2.checkpoint.image against transformers' BlipImageProcessorPil, plus every bad input it must refuse.

Parity tolerance is 1e-6: both sides run the same PIL conversion and resize on the same uint8
pixels, then the same float64 -> float32 rescale and float32 normalize, so the outputs should be
bit-identical; 1e-6 (a few float32 ulps at |x| ~ 2) only allows for summation-order noise.
"""

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from transformers import BlipImageProcessorPil

from miniblip2.checkpoint.image import ImageConfig, load_image, preprocess, read_image_config
from miniblip2.errors import CheckpointError, ImageError
from miniblip2.testing.tiny_tokenizer import build_tiny_processor_files

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "blip2-opt-2.7b"
PARITY = 1e-6
LEVEL = 1 / 255 / min(ImageConfig().image_std)  # one 8-bit step after normalizing: ~0.0146


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """blip2-opt-2.7b's preprocessor_config.json, or the identical tiny copy without ../shared."""
    if REFERENCE.is_dir():
        return REFERENCE
    folder = tmp_path_factory.mktemp("preprocessor")
    build_tiny_processor_files(folder, image_size=224, num_query_tokens=32)
    return folder


@pytest.fixture(scope="module")
def hf(config_folder):
    return BlipImageProcessorPil.from_pretrained(config_folder)


@pytest.fixture(scope="module")
def config(config_folder):
    return read_image_config(config_folder)


def hf_pixels(hf, images) -> np.ndarray:
    return hf(images, return_tensors="np")["pixel_values"]


def noise(h, w, c=3, seed=0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def palette_with_transparency() -> PIL.Image.Image:
    image = PIL.Image.fromarray(noise(40, 30)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3  # palette entry 3 is see-through, as in a GIF or a PNG tRNS chunk
    return image


# Built in the test with PIL / NumPy; each covers one branch of the RGB conversion.
IMAGES = {
    "rgb-500x300": lambda: PIL.Image.fromarray(noise(300, 500)),
    "rgb-1x1": lambda: PIL.Image.fromarray(noise(1, 1)),
    "rgb-tall-90x700": lambda: PIL.Image.fromarray(noise(700, 90, seed=1)),
    "rgb-224-no-resize": lambda: PIL.Image.fromarray(noise(224, 224, seed=2)),
    "rgba": lambda: PIL.Image.fromarray(noise(50, 60, 4)),
    "la": lambda: PIL.Image.fromarray(noise(50, 60, 4)).convert("LA"),
    "p": lambda: PIL.Image.fromarray(noise(40, 30)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16),
    "p-transparent": palette_with_transparency,
    "cmyk": lambda: PIL.Image.fromarray(noise(40, 30)).convert("CMYK"),
    "l": lambda: PIL.Image.fromarray(noise(40, 30, None)),
    "1-bit": lambda: PIL.Image.fromarray(noise(40, 30, None)).convert("1"),
    "ycbcr": lambda: PIL.Image.fromarray(noise(40, 30)).convert("YCbCr"),
    "i16-8bit-values": lambda: PIL.Image.fromarray(noise(40, 30, None).astype(np.uint16)),
    "f-0-255": lambda: PIL.Image.fromarray(noise(40, 30, None).astype(np.float32) + 0.25),
}


@pytest.mark.parametrize("name", IMAGES)
def test_matches_blip_image_processor_pil(hf, config, name):
    image = IMAGES[name]()
    expected = hf_pixels(hf, image)  # [1, 3, 224, 224]
    got = preprocess(image, config)
    assert got.shape == expected.shape == (1, 3, 224, 224) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= PARITY


def test_batch_of_mixed_images_matches(hf, config):
    images = [IMAGES[name]() for name in ("rgb-500x300", "cmyk", "p-transparent", "rgb-1x1")]
    got = preprocess(images, config)
    assert got.shape == (4, 3, 224, 224)
    assert np.abs(got - hf_pixels(hf, images)).max() <= PARITY


def test_pixel_values_are_really_normalized(config):
    # A 1x1 white image resizes to 224x224 of (1 - mean) / std exactly: nothing is off by a step.
    got = preprocess(PIL.Image.new("RGB", (1, 1), (255, 255, 255)), config)
    expected = (1 - np.array(config.image_mean)) / np.array(config.image_std)  # [3]
    np.testing.assert_allclose(got[0, :, 100, 7], expected, atol=1e-6)
    assert np.ptp(got, axis=(0, 2, 3)).max() < 1e-6  # one colour everywhere


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_uint8_arrays_match_the_same_pil_image(hf, config, channels):
    array = noise(33, 47, channels, seed=3)
    as_pil = PIL.Image.fromarray(array[..., 0] if channels == 1 else array)
    assert np.abs(preprocess(array, config) - hf_pixels(hf, as_pil)).max() <= PARITY


def test_float_arrays_are_rescaled_once(hf, config):
    # Documented choice: floats in [0, 1] mean 0..255 / 255. transformers' PIL processor rescales
    # them into 8 bits for resizing, back to [0, 1], and then applies 1/255 a second time.
    array = noise(20, 30, seed=4)
    floats = array / 255.0
    assert np.abs(preprocess(floats, config) - hf_pixels(hf, PIL.Image.fromarray(array))).max() <= PARITY
    upstream = hf_pixels(hf, floats)
    assert np.abs(upstream - preprocess(floats, config)).max() > 100 * LEVEL  # upstream is ~black


def test_16_bit_images_are_scaled_not_clipped(hf, config):
    values = np.random.default_rng(5).integers(0, 65536, (40, 30), dtype=np.uint16)
    reference = PIL.Image.fromarray((values >> 8).astype(np.uint8))  # the same picture in 8 bits
    for image in (PIL.Image.fromarray(values), PIL.Image.fromarray(values.astype(np.int32)),
                  PIL.Image.frombytes("I;16B", (30, 40), values.astype(">u2").tobytes())):
        assert image.mode in ("I;16", "I", "I;16B")
        assert np.abs(preprocess(image, config) - hf_pixels(hf, reference)).max() <= PARITY, image.mode
    # transformers' own convert("RGB") clips at 255: >99% of this image turns pure white.
    upstream = np.asarray(PIL.Image.fromarray(values).convert("RGB"))
    assert (upstream == 255).mean() > 0.99


def test_float_mode_in_0_1_is_scaled_by_255(hf, config):
    values = np.random.default_rng(6).random((40, 30)).astype(np.float32)
    reference = PIL.Image.fromarray(np.round(values.astype(np.float64) * 255).astype(np.uint8))
    assert np.abs(preprocess(PIL.Image.fromarray(values), config) - hf_pixels(hf, reference)).max() <= PARITY
    assert np.asarray(PIL.Image.fromarray(values).convert("RGB")).max() <= 1  # upstream: black


def test_paths_load_like_transformers(hf, config, tmp_path):
    path = tmp_path / "photo.png"
    PIL.Image.fromarray(noise(64, 48, seed=7)).save(path)
    for as_given in (path, str(path)):
        got = preprocess(as_given, config)
        assert np.abs(got - hf_pixels(hf, str(path))).max() <= PARITY


def test_exif_rotation_is_applied_to_files(tmp_path):
    # transformers' load_image (used for paths) applies EXIF orientation; so does load_image.
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    PIL.Image.fromarray(noise(20, 40)).save(path, exif=exif)
    from transformers.image_utils import load_image as hf_load_image
    upright = load_image(path)
    assert upright.size == (20, 40)
    assert np.array_equal(np.asarray(upright), np.asarray(hf_load_image(str(path))))


def test_transparent_file_is_composited_like_the_pil_image(tmp_path):
    # A path and the opened PIL image give the same pixels here; transformers' load_image instead
    # drops alpha for paths (convert("RGB")), so the colour hidden under alpha = 0 shows there.
    path = tmp_path / "clear.png"
    PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert np.asarray(load_image(path)).tolist() == np.asarray(load_image(PIL.Image.open(path))).tolist()
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]


def test_config_defaults_are_transformers_defaults():
    hf = BlipImageProcessorPil()
    default = ImageConfig()
    assert (default.height, default.width) == (hf.size.height, hf.size.width) == (384, 384)
    assert default.resample == hf.resample == 3
    assert default.rescale_factor == hf.rescale_factor
    assert default.image_mean == tuple(hf.image_mean) and default.image_std == tuple(hf.image_std)
    assert (default.do_resize, default.do_rescale, default.do_normalize, default.do_convert_rgb) == (
        hf.do_resize, hf.do_rescale, hf.do_normalize, hf.do_convert_rgb)


def test_reads_the_real_preprocessor_config():
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not beside the repo")
    assert read_image_config(REFERENCE) == ImageConfig(
        height=224, width=224, rescale_factor=0.00392156862745098)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("size, expected", [
    (64, dict(height=64, width=64)),
    ({"height": 32, "width": 48}, dict(height=32, width=48)),
    ({"shortest_edge": 40}, dict(shortest_edge=40)),
])
def test_v5_processor_config_and_size_forms(tmp_path, size, expected):
    # transformers v5 writes the image processor inside processor_config.json.
    write_json(tmp_path / "processor_config.json", {"image_processor": {"size": size, "do_pad": True}})
    config = read_image_config(tmp_path)
    assert {k: getattr(config, k) for k in expected} == expected
    image = PIL.Image.fromarray(noise(30, 70, seed=8))
    hf = BlipImageProcessorPil.from_pretrained(tmp_path)
    assert np.abs(preprocess(image, config) - hf_pixels(hf, image)).max() <= PARITY


def test_missing_or_bad_config_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        read_image_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="could not be read as JSON"):
        read_image_config(tmp_path)
    write_json(tmp_path / "preprocessor_config.json", {"size": {"longest_edge": 3}})
    with pytest.raises(CheckpointError, match="size"):
        read_image_config(tmp_path)
    write_json(tmp_path / "preprocessor_config.json", {"resample": 9})
    with pytest.raises(CheckpointError, match="resample"):
        read_image_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad input: always an ImageError with a message that says what to do, never a PIL traceback.

def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_files(tmp_path):
    cases = {
        "missing.png": (None, "no such file"),
        "notes.png": (b"just some text, not an image\n" * 20, "could not be read as an image"),
        "corrupt.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "could not be read as an image"),
        "truncated.png": (png_bytes(noise(64, 64))[:2000], "could not be read as an image"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageError, match=message):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_truncated_pil_image_opened_lazily(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(png_bytes(noise(64, 64))[:2000])
    image = PIL.Image.open(path)  # opens fine: PIL reads only the header until the pixels are used
    with pytest.raises(ImageError, match="corrupt or truncated") as caught:
        load_image(image)
    assert isinstance(caught.value.__cause__, OSError)


def test_decompression_bomb(tmp_path, monkeypatch):
    # Lower PIL's limit instead of writing a huge file: 64x64 = 4096 > 2 x 1000 is a "bomb".
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(noise(64, 64)))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS") as caught:
        load_image(path)
    assert isinstance(caught.value.__cause__, PIL.Image.DecompressionBombError)


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((5, 0), np.uint8), "empty"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"\[H, W\] or \[H, W, C\]"),
    (np.zeros(10, np.uint8), r"\[H, W\] or \[H, W, C\]"),
    (np.zeros((3, 8, 8), np.uint8), "transpose"),
    (np.zeros((8, 8, 2), np.uint8), "C = 1, 3 or 4"),
    (np.zeros((8, 8, 3), np.int16), "dtype int16"),
    (np.full((8, 8, 3), np.nan), "NaN"),
    (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
])
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_bad_objects(config):
    with pytest.raises(ImageError, match="empty"):
        load_image(PIL.Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="cannot use a dict"):
        load_image({"pixels": 1})
    with pytest.raises(ImageError, match="NaN"):
        load_image(PIL.Image.fromarray(np.full((4, 4), np.nan, np.float32)))
    with pytest.raises(ImageError, match="no images"):
        preprocess([], config)


def test_shortest_edge_batches_of_different_shapes_are_refused():
    images = [PIL.Image.new("RGB", (40, 20)), PIL.Image.new("RGB", (20, 40))]
    with pytest.raises(ImageError, match="different shapes"):
        preprocess(images, ImageConfig(shortest_edge=16))


def test_against_torchvision_backend(config):
    """transformers v5's default BlipImageProcessor resizes with torchvision (antialiased bicubic
    on uint8 tensors), which is close to PIL's but not bit-identical. Measured here (torchvision
    0.28 with torch 2.13): max 1 8-bit step (0.015) on smooth pictures and on 500x300 noise."""
    try:
        import torchvision  # noqa: F401  (a CUDA-built wheel on CPU torch fails with RuntimeError)
        from transformers import BlipImageProcessor
    except Exception as err:
        pytest.skip(f"torchvision backend unavailable: {err}")
    hf = BlipImageProcessor(size={"height": config.height, "width": config.width})  # rest: defaults
    y, x = np.mgrid[0:480, 0:640]
    smooth = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), (x + y) % 256], -1)
    for image in (PIL.Image.fromarray(smooth.astype(np.uint8)), PIL.Image.fromarray(noise(300, 500))):
        difference = np.abs(hf(image, return_tensors="np")["pixel_values"] - preprocess(image, config))
        assert difference.max() <= 2 * LEVEL and difference.mean() <= 0.01 * LEVEL
