"""miniblip2: BLIP-2 written from scratch in NumPy, matching transformers' implementation.

    import miniblip2
    model = miniblip2.load("weights/blip2-opt-2.7b")     # or blip2-flan-t5-xl
    model.caption("cat.jpg")
    matcher = miniblip2.load("weights/blip2-itm-vit-g")
    matcher.match("cat.jpg", ["a cat", "a dog"])         # the probability that each text fits
"""

from . import shapes
from .blip2 import Blip2
from .blip2_retrieval import Blip2Features, Blip2Retrieval, Blip2TextWithProjection, Blip2VisionWithProjection
from .checkpoint.processor import load_processor
from .errors import CheckpointError, DeviceError, ImageError, MiniBlip2Error, PromptError
from .families import load
from .generation.chat import chat_prompt
from .generation.streaming import TextStreamer
from .shapes.shipped import weights_folder

__all__ = ["Blip2", "Blip2Features", "Blip2Retrieval", "Blip2TextWithProjection", "Blip2VisionWithProjection",
           "CheckpointError", "DeviceError", "ImageError", "MiniBlip2Error", "PromptError", "TextStreamer",
           "caption", "chat_prompt", "load", "load_processor", "shapes"]
__version__ = "0.1.0"

_loaded = {}


def caption(image, prompt=None, weights=None, max_new_tokens=30, device="cpu", dtype="float32", **generate_kwargs):
    """Caption one image (or a list) with the checkpoint in folder `weights` (default:
    $MINIBLIP2_WEIGHTS, else the shipped shapes model); each model is loaded once."""
    folder = weights_folder(weights)
    key = (str(folder), device, dtype)
    if key not in _loaded:
        _loaded[key] = load(folder, dtype=dtype, device=device)
    return _loaded[key].caption(image, prompt=prompt, max_new_tokens=max_new_tokens, **generate_kwargs)
