"""The errors miniblip2 raises on bad input: one clear message that says what to do.

Every message names the file, key or argument at fault, the value found, and what to do."""


class MiniBlip2Error(ValueError):
    """Base class: every bad-input error of miniblip2 is one of these."""


class CheckpointError(MiniBlip2Error):
    """A checkpoint folder, config, weights, tokenizer or processor file that cannot be used."""


class ImageError(MiniBlip2Error):
    """An image or pixel_values that cannot be read, converted to RGB or encoded."""


class PromptError(MiniBlip2Error):
    """A prompt or generation request that does not fit the model."""


class DeviceError(MiniBlip2Error):
    """A device or compute dtype that cannot be used: an unknown name, or CUDA asked for without
    CuPy or a GPU."""


class NonFiniteError(MiniBlip2Error):
    """NaN or infinity where the model needs numbers: in the scores of a generation step (from
    weights, pixels or settings that overflow), reported instead of being decoded into text."""
