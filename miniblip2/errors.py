"""The errors miniblip2 raises on bad input: one clear message that says what to do."""


class MiniBlip2Error(ValueError):
    """Base class: every bad-input error of miniblip2 is one of these."""


class CheckpointError(MiniBlip2Error):
    """A checkpoint folder, config or safetensors file that cannot be used."""


class ImageError(MiniBlip2Error):
    """An image that cannot be read or converted to RGB."""


class PromptError(MiniBlip2Error):
    """A prompt or generation request that does not fit the model."""


class DeviceError(MiniBlip2Error):
    """A device that cannot be used: an unknown name, or CUDA asked for without CuPy or a GPU."""
