"""miniblip2: BLIP-2 written from scratch in NumPy, matching transformers' implementation.

    import miniblip2
    model = miniblip2.load("weights/blip2-opt-2.7b")
    model.caption("cat.jpg")
"""

from .chat import chat_prompt
from .errors import CheckpointError, DeviceError, ImageError, MiniBlip2Error, PromptError
from .model import Blip2, load
from .processor import load_processor
from .streaming import TextStreamer

__all__ = ["Blip2", "CheckpointError", "DeviceError", "ImageError", "MiniBlip2Error", "PromptError", "TextStreamer",
           "caption", "chat_prompt", "load", "load_processor"]
__version__ = "0.1.0"

_loaded = {}


def caption(image, prompt=None, weights=None, max_new_tokens=30, **generate_kwargs):
    """Caption one image (or a list) with the checkpoint in folder `weights`; the model is loaded once."""
    if weights is None:
        raise CheckpointError("give weights=<checkpoint folder>, e.g. weights='weights/blip2-opt-2.7b' "
                              "(weights/README.md says how to download it)")
    key = str(weights)
    if key not in _loaded:
        _loaded[key] = load(weights)
    return _loaded[key].caption(image, prompt=prompt, max_new_tokens=max_new_tokens, **generate_kwargs)
