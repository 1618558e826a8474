"""miniblip2: BLIP-2 written from scratch in NumPy, matching transformers' implementation.

    import miniblip2
    model = miniblip2.load("weights/blip2-opt-2.7b")     # or blip2-flan-t5-xl
    model.caption("cat.jpg")
    matcher = miniblip2.load("weights/blip2-itm-vit-g")
    matcher.match("cat.jpg", ["a cat", "a dog"])         # the probability that each text fits
    blip = miniblip2.load("weights/blip-vqa-base")       # BLIP: blip-image-captioning-*, blip-vqa-*
    blip.answer("cat.jpg", "how many cats are there?")
    miniblip2.load("weights/blip-itm-base-coco").match("cat.jpg", ["a cat", "a dog"])  # BLIP's ITM
"""

from . import shapes
from .blip import Blip, BlipQuestionAnswering
from .blip2 import Blip2
from .blip_retrieval import BlipFeatures, BlipRetrieval, BlipText, BlipVision
from .blip2_retrieval import Blip2Features, Blip2Retrieval, Blip2TextWithProjection, Blip2VisionWithProjection
from .checkpoint.processor import load_processor
from .errors import CheckpointError, DeviceError, ImageError, MiniBlip2Error, NonFiniteError, PromptError
from .families import load
from .generation.chat import chat_prompt
from .generation.streaming import TextStreamer
from .shapes.shipped import weights_folder

__all__ = ["Blip", "BlipFeatures", "BlipQuestionAnswering", "BlipRetrieval", "BlipText", "BlipVision", "Blip2", "Blip2Features", "Blip2Retrieval", "Blip2TextWithProjection", "Blip2VisionWithProjection",
           "CheckpointError", "DeviceError", "ImageError", "MiniBlip2Error", "NonFiniteError", "PromptError",
           "TextStreamer",
           "caption", "chat_prompt", "load", "load_processor", "shapes"]
__version__ = "0.1.0"

_loaded = {}


def caption(image, prompt=None, weights=None, max_new_tokens=30, device="cpu", dtype="float32", **generate_kwargs):
    """Caption one image (or a list) with the checkpoint in folder `weights` (default:
    $MINIBLIP2_WEIGHTS, else the shipped shapes model); each model is loaded once."""
    folder = weights_folder(weights)
    key = (str(folder), str(device), str(dtype))  # load checks them; any value can be a key
    if key not in _loaded:
        _loaded[key] = load(folder, dtype=dtype, device=device)
    return _loaded[key].caption(image, prompt=prompt, max_new_tokens=max_new_tokens, **generate_kwargs)
