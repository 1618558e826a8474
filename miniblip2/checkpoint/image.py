"""Image preprocessing: any picture -> pixel_values [B, 3, 224, 224] float32 for the vision tower.

Mirrors transformers' `BlipImageProcessorPil` (models/blip/image_processing_pil_blip.py, with the
`PilBackend` steps in image_processing_backends.py and the helpers in image_transforms.py):

    load_image    path / PIL / NumPy -> PIL RGB        transparency composited onto white
    resize        PIL RGB -> PIL RGB [224, 224]        PIL bicubic on uint8, as transformers does
    rescale       uint8 [H, W, 3] -> float32 in [0, 1] x * 1/255, computed in float64
    normalize     float32 -> float32                   (x - CLIP mean) / CLIP std, per channel
    preprocess    the above for a batch -> [B, 3, H, W]

transformers v5's default `BlipImageProcessor` resizes with torchvision instead of PIL; its
antialiased bicubic is close to PIL's but not bit-identical, so pixel parity is with the PIL one.

Legend: B images in a batch, H height, W width (224 x 224 for blip2-opt-2.7b), C channels (3, RGB).
"""

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from ..errors import CheckpointError, ImageError
from .config import check_field, read_json
from .paths import kind, user_path

# OPENAI_CLIP_MEAN / OPENAI_CLIP_STD in transformers' image_utils.py: BLIP-2's EVA ViT was
# trained with CLIP's statistics, not ImageNet's.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Modes that store more than 8 bits per pixel. PIL's own convert("RGB") clips their raw values at
# 255, which turns a 16-bit photo white; load_image scales them down instead (see to_8bit).
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# `BlipImageProcessor` class attributes (image_processing_blip.py) and `BaseImageProcessor`'s
# rescale_factor. Hub files store only values that differ from these, so these must be the
# defaults; blip2-opt-2.7b's preprocessor_config.json overrides size to 224 x 224.
@dataclass(frozen=True)
class ImageConfig:
    height: int = 384
    width: int = 384
    shortest_edge: int | None = None  # {"shortest_edge": s} keeps the aspect ratio instead
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_convert_rgb: bool = True  # informational: load_image always gives RGB, the model needs 3 channels


# `BlipImageProcessor.from_pretrained`: preprocessor_config.json, or the "image_processor" entry
# that transformers v5 writes into processor_config.json instead.
# Every value is checked against ImageConfig's annotation as config.json's are (config.check_field):
# a rescale_factor given as a string, a std of 0 (a division by zero), a NaN, refused here.
def read_image_config(folder) -> ImageConfig:
    folder = Path(folder)
    settings, file = image_processor_settings(folder)
    known = {f.name: f for f in fields(ImageConfig)}
    values = {k: v for k, v in settings.items() if k in known and v is not None}
    values.update(size_fields(settings.get("size"), folder / file))
    for key in ("image_mean", "image_std"):
        if key in values:
            values[key] = channel_values(values[key], key, folder / file)
    values = {k: check_field(f"{folder / file}: {k}", k, v, known[k].type, file) for k, v in values.items()}
    if values.get("resample", 3) not in {int(r) for r in PIL.Image.Resampling}:
        raise CheckpointError(f"{folder / file}: resample={values['resample']!r} is not a PIL resampling "
                              "filter (0-5); fix the image processor config.")
    return ImageConfig(**values)


# The image processor's settings as saved, and the file they came from: its own file, or (v5) an
# entry of the processor's.
def image_processor_settings(folder: Path) -> tuple[dict, str]:
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        return read_json(preprocessor), preprocessor.name
    processor = folder / "processor_config.json"
    if processor.is_file() and isinstance(read_json(processor).get("image_processor"), dict):
        return read_json(processor)["image_processor"], processor.name
    raise CheckpointError(f"{folder} has no preprocessor_config.json (and no processor_config.json "
                          "with an 'image_processor' entry); download it with the checkpoint.")


# `get_size_dict` in image_processing_utils.py: an int means a square (default_to_square=True).
def size_fields(size, folder: Path) -> dict:
    if isinstance(size, dict):
        size = {k: v for k, v in size.items() if v is not None}  # v5 SizeDicts write unset keys as null
    if size is None:
        return {}
    if is_positive_int(size):
        return {"height": size, "width": size}
    if isinstance(size, dict) and set(size) == {"height", "width"} and all(map(is_positive_int, size.values())):
        return {"height": size["height"], "width": size["width"]}
    if isinstance(size, dict) and set(size) == {"shortest_edge"} and is_positive_int(size["shortest_edge"]):
        return {"shortest_edge": size["shortest_edge"]}
    raise CheckpointError(f"{folder}: image processor size {size!r} is not supported; use an int, "
                          '{"height": h, "width": w} or {"shortest_edge": s}.')


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# image_mean / image_std: three numbers, one per RGB channel (transformers also allows one number).
def channel_values(values, key: str, folder: Path) -> tuple:
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,) * 3
    if len(values) != 3:
        raise CheckpointError(f"{folder}: {key} = {values!r}; RGB needs 3 numbers (or one number).")
    return values  # each checked to be a finite number (and the std's above 0) by check_field


# ---------------------------------------------------------------------------------------------
# Loading: path, PIL image or array -> PIL RGB image.

# `load_image` (image_utils.py) for paths, then `convert_to_rgb` (image_transforms.py) for all.
def load_image(image) -> PIL.Image.Image:
    """Return `image` as an RGB PIL image. Accepts:
    - a path (str or Path) to any file PIL can read; EXIF rotation is applied, as transformers
      does for paths;
    - a PIL image of any mode (RGB, RGBA, LA, P, CMYK, L, 1, I;16, I, F, ...);
    - a NumPy array [H, W] or [H, W, C] with C = 1, 3 or 4 (gray, RGB, RGBA), dtype uint8
      (0..255) or float (0..1; scaled by 255 and rounded). Channels-first [C, H, W] arrays are
      not guessed at: transpose them first.
    Transparent pixels are composited onto white. 16/32-bit images are scaled down to 8 bits.
    """
    if isinstance(image, (str, Path)):
        image = open_image_file(user_path(image, "the image path", ImageError))
    elif isinstance(image, np.ndarray):
        image = array_to_pil(image)
    elif isinstance(image, PIL.Image.Image):
        image = decoded(image)
    else:
        raise ImageError(f"cannot use a {type(image).__name__} as an image; pass a file path, a "
                         "PIL.Image.Image or a NumPy array [H, W] / [H, W, C].")
    if min(image.size) == 0:
        raise ImageError(f"the image is empty ({image.size[0]}x{image.size[1]} pixels); pass a "
                         "picture at least 1 pixel wide and high.")
    return to_rgb(to_8bit(image))


# `PIL.Image.open` + `ImageOps.exif_transpose`, as transformers' load_image does for a path.
def open_image_file(path: Path) -> PIL.Image.Image:
    found = kind(path, "the image path", ImageError)
    if found is None:
        raise ImageError(f"{path}: no such file; check the path.")
    if found != "file":
        raise ImageError(f"{path} is a {found}, not a file; pass the path of an image file.")
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now, inside the try: a truncated file fails here, not later
            return PIL.ImageOps.exif_transpose(image)  # a detached, upright copy
    except PIL.Image.DecompressionBombError as err:
        raise ImageError(f"{path} is too large to open safely ({err}). If you trust it, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS or downscale the file first.") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise ImageError(f"{path} could not be read as an image ({type(err).__name__}: {err}); "
                         "it is not an image, or it is corrupt or truncated.") from err


def decoded(image: PIL.Image.Image) -> PIL.Image.Image:
    """A lazily opened PIL image decodes on first use; do it here so bad data is an ImageError."""
    try:
        image.load()
    except Exception as err:
        raise ImageError(f"the PIL image could not be decoded ({type(err).__name__}: {err}); "
                         "the file behind it is corrupt or truncated.") from err
    return image


# NumPy input: [H, W] or [H, W, C] -> PIL "L", "RGB" or "RGBA".
def array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ImageError(f"an image array must be [H, W] or [H, W, C] with C = 1, 3 or 4; got shape "
                         f"{array.shape}. Pass one image at a time (or a list), channels last "
                         "(for [C, H, W] use array.transpose(1, 2, 0)).")
    if array.size == 0:
        raise ImageError(f"the image array is empty (shape {array.shape}); pass a picture at least "
                         "1 pixel wide and high.")
    pixels = array_to_uint8(array)  # [H, W] or [H, W, C]
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]  # [H, W]: PIL has no one-channel [H, W, 1] layout
    return PIL.Image.fromarray(np.ascontiguousarray(pixels))


# The 8-bit pixels PIL resizes: uint8 as is, floats in [0, 1] scaled by 255, anything else refused.
def array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageError(f"image arrays must be uint8 (0..255) or float (0..1); got dtype {array.dtype}. "
                         "Convert first, e.g. (a >> 8).astype(np.uint8) for 16-bit data.")
    if not np.isfinite(array).all():
        raise ImageError("the image array contains NaN or infinite values; fix or drop those pixels.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(f"float image arrays must lie in [0, 1]; got values in [{low}, {high}]. "
                         "Divide by 255 (for 0..255 data) or pass a uint8 array.")
    # Round, not truncate: 0.5/255 steps land on the nearest 8-bit level.
    return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)


# High bit depth -> "L". transformers calls PIL's convert("RGB"), which clips raw values at 255:
# a 16-bit image (0..65535) comes out almost all white and a float image in 0..1 all black.
# Here: values that already fit 0..255 (the scale PIL assumes) are kept, so any image transformers
# handles correctly gives the same pixels; 16-bit data is shifted right by 8 (65535 -> 255); a
# float image in [0, 1] is scaled by 255 like a float array; other float data follows PIL.
def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image)  # [H, W] uint16 / int32 / float32
    if image.mode == "F":
        return float_to_8bit(image, values)
    if values.max() <= 255:
        return PIL.Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return PIL.Image.fromarray((np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8))


# Mode "F": [0, 1] data scaled like a float array; anything else by PIL's rule, as transformers.
def float_to_8bit(image: PIL.Image.Image, values: np.ndarray) -> PIL.Image.Image:
    if not np.isfinite(values).all():
        raise ImageError("the float (mode F) image contains NaN or infinite values; fix those pixels.")
    if values.min() >= 0.0 and values.max() <= 1.0:
        return PIL.Image.fromarray(np.round(values.astype(np.float64) * 255.0).astype(np.uint8))
    return image.convert("L")  # PIL's own rule: clip to 0..255, truncate


# `convert_to_rgb` in image_transforms.py, PIL branch: anything with an alpha band or a
# transparent palette/colour is composited onto white, so transparent pixels read as white paper
# instead of whatever colour happens to be stored under alpha = 0.
def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    if is_transparent(image):
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # CMYK, P, L, 1, YCbCr, ... (a copy when already RGB)


# An alpha band (RGBA, LA, PA, and their premultiplied RGBa, La) or a transparent palette entry
# or colour. Not a band named "A": LAB's A is the green-red axis, and compositing it would
# treat a colour channel as opacity.
def is_transparent(image: PIL.Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.info.get("transparency") is not None


# ---------------------------------------------------------------------------------------------
# The pixel math: PIL RGB -> [3, H, W] float32.

# `PilBackend.resize` -> `image_transforms.resize`: PIL resamples the uint8 image (bicubic, with
# PIL's own antialiasing when shrinking), so results are rounded back to 8 bits here, as upstream.
def resize(image: PIL.Image.Image, config: ImageConfig) -> PIL.Image.Image:
    if not config.do_resize:
        return image
    height, width = output_size(image.height, image.width, config)
    return image.resize((width, height), resample=config.resample)  # PIL takes (width, height)


# `get_resize_output_image_size` (image_transforms.py) with default_to_square=False for
# {"shortest_edge": s}: the short side becomes s, the long side is truncated, not rounded.
def output_size(height: int, width: int, config: ImageConfig) -> tuple[int, int]:
    if config.shortest_edge is None:
        return config.height, config.width
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


# `image_transforms.rescale`: multiply in float64, then downcast to float32, exactly as upstream
# (doing it in float32 differs in the last bit for some of the 256 levels).
def rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    return (pixels.astype(np.float64) * factor).astype(np.float32)  # [H, W, 3]


# `image_transforms.normalize`: float32 throughout, mean and std cast to the image's dtype.
def normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    pixels = pixels.astype(np.float32)  # uint8 when rescaling is off
    return (pixels - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)  # [H, W, 3]


# `PilBackend._preprocess` for one image: resize -> rescale -> normalize -> channels first.
def pixel_values_of(image: PIL.Image.Image, config: ImageConfig) -> np.ndarray:
    pixels = np.asarray(resize(image, config))  # [224, 224, 3] uint8
    if config.do_rescale:
        pixels = rescale(pixels, config.rescale_factor)  # [224, 224, 3] float32 in [0, 1]
    if config.do_normalize:
        pixels = normalize(pixels, config.image_mean, config.image_std)  # roughly [-1.8, 2.2]
    return pixels.transpose(2, 0, 1).astype(np.float32)  # [3, 224, 224]: PyTorch's NCHW


# `BlipImageProcessorPil.__call__(images)["pixel_values"]`.
def preprocess(images, config: ImageConfig) -> np.ndarray:
    """One image or a list of images (anything load_image takes) -> [B, 3, H, W] float32."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ImageError("no images given; pass one image or a non-empty list of images.")
    pixel_values = [pixel_values_of(load_image(image), config) for image in images]  # B x [3, H, W]
    shapes = {p.shape for p in pixel_values}
    if len(shapes) > 1:
        raise ImageError(f"the images resize to different shapes {sorted(shapes)} and cannot be "
                         "batched; preprocess them one at a time.")
    return np.stack(pixel_values)  # [B, 3, 224, 224]
