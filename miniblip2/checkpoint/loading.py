"""Loading runs one way, for every family:

    read the files as stored (memory-mapped: safetensors.py, or torch_bin.py for a folder that has
    only pytorch_model.bin, read through an allowlist that rebuilds tensors and runs nothing)
 -> check coverage and shapes against the model's {name: shape} (every key there, none unused)
 -> cast to the asked dtype (precision.py; bfloat16 stays 16-bit bits)
 -> nest by checkpoint name (`w["qformer"]["encoder"]["layer"][2]` is `qformer.encoder.layer.2.*`)
 -> move to the device (NumPy stays put, CuPy copies once)

A family (blip2.py) says what it expects; tower files never import this.
"""

from pathlib import Path

from ..errors import CheckpointError
from ..runtime.device import array_module, to_device
from ..runtime.precision import cast_weights, check_dtype
from .safetensors import INDEX_FILE, SINGLE_FILE, check_weights, load_checkpoint, nest
from .torch_bin import load_torch_checkpoint

TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_folder(path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give the folder of a checkpoint "
                              "(config.json, *.safetensors, tokenizer files); see weights/README.md")
    return folder


# PreTrainedModel.from_pretrained(folder, dtype=...).to(device), for the weights.
def load_weights(folder, expected, tied=None, ignored=(), dtype="float32", keep_float32=(), device="cpu",
                 progress=True):
    """Nested weights on `device`: `expected` {name: shape}, `tied` {absent name: its source},
    `ignored` names the file may hold that the model does not use (dropped)."""
    dtype = check_dtype(dtype)
    xp = array_module(device)  # before reading 15 GB: a missing CuPy or GPU fails at once
    flat = read_as_stored(folder, progress)
    flat = check_weights(flat, expected, tied=tied or {}, ignored_prefixes=ignored)
    weights = nest(cast_weights(flat, dtype, keep_float32))
    return weights if device == "cpu" else to_device(weights, xp)


# Safetensors where the folder has them (as transformers prefers them); else pytorch_model.bin,
# which some BLIP checkpoints have alone on the hub's main branch.
def read_as_stored(folder, progress=True):  # -> {name: array as stored}
    folder = Path(folder)
    has_safetensors = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
    if not has_safetensors and any((folder / name).is_file() for name in TORCH_FILES):
        return load_torch_checkpoint(folder)
    return load_checkpoint(folder, dtype=None, progress=progress)
