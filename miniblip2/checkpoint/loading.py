"""Loading runs one way, for every family:

    read the files as stored (memory-mapped: safetensors.py, or torch_bin.py for a folder that has
    only pytorch_model.bin, read through an allowlist that rebuilds tensors and runs nothing)
 -> check coverage and shapes against the model's {name: shape} (every key there, none unused)
 -> cast to the asked dtype (precision.py; bfloat16 stays 16-bit bits)
 -> nest by checkpoint name (`w["qformer"]["encoder"]["layer"][2]` is `qformer.encoder.layer.2.*`)
 -> move to the device (NumPy stays put, CuPy copies once)

A family (blip2.py) says what it expects; tower files never import this.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..runtime.device import array_module, to_device
from ..runtime.precision import cast_weights, check_dtype
from .paths import kind, missing_hint, user_path
from .safetensors import INDEX_FILE, SINGLE_FILE, bf16_to_float32, check_weights, is_bf16, load_checkpoint, nest
from .torch_bin import load_torch_checkpoint

TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_folder(path) -> Path:
    folder = user_path(path, "the checkpoint folder", CheckpointError)
    found = kind(folder, "the checkpoint folder", CheckpointError)
    if found is None:
        raise CheckpointError(f"{folder} does not exist" + (missing_hint(folder) or (
            "; give the folder of a checkpoint (config.json, *.safetensors, tokenizer files); see weights/README.md")))
    if found != "folder":
        raise CheckpointError(f"{folder} is a {found}, not a folder; give the folder of a checkpoint "
                              "(config.json, *.safetensors, tokenizer files); see weights/README.md")
    return folder


# PreTrainedModel.from_pretrained(folder, dtype=...).to(device), for the weights.
def load_weights(folder, expected, tied=None, ignored=(), dtype="float32", keep_float32=(), device="cpu",
                 progress=True, check_finite=True):
    """Nested weights on `device`: `expected` {name: shape}, `tied` {absent name: its source},
    `ignored` names the file may hold that the model does not use (dropped). `check_finite`
    reads every weight once for NaN and infinity (see check_finite_weights)."""
    dtype = check_dtype(dtype)
    xp = array_module(device)  # before reading 15 GB: a missing CuPy or GPU fails at once
    flat = read_as_stored(folder, progress)
    flat = check_weights(flat, expected, tied=tied or {}, ignored_prefixes=ignored)
    if check_finite:
        check_finite_weights(flat, folder)
    weights = nest(cast_weights(flat, dtype, keep_float32))
    return weights if device == "cpu" else to_device(weights, xp)


# A NaN or infinity in one weight makes every caption NaN, which would decode into nonsense: it is
# found here, at load, and named. The check reads every byte of the memory-mapped files once, in
# chunks on all cores: 10.5 GB/s on the 2-core development machine (0.22 s for a 2.35 GB
# blip2-opt-2.7b cut to 4 layers), so ~1.5 s for the real 15 GB, whose first caption takes
# 20-40 s and reads every byte anyway (from a cold disk the scan only moves that read earlier:
# load + first caption went from 3.25 s to 3.5 s). load(..., check_finite=False) skips it.
FINITE_CHUNK = 1 << 22  # elements per task: 16 MB of float32, no large temporary


def check_finite_weights(flat, folder) -> None:
    first_names = {}  # a tied weight is one array under two names: scan it once, name it as stored
    for name, array in flat.items():
        first_names.setdefault(id(array), (name, array))
    tasks = [(name, array.reshape(-1)[start:start + FINITE_CHUNK], is_bf16(array))
             for name, array in first_names.values()
             if array.dtype.kind == "f" or is_bf16(array)
             for start in range(0, array.size, FINITE_CHUNK)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for name, finite in pool.map(lambda task: (task[0], all_finite(task[1], task[2])), tasks):
            if not finite:
                pool.shutdown(cancel_futures=True)
                raise CheckpointError(non_finite_message(folder, name, flat[name]))


def all_finite(chunk, bf16: bool) -> bool:
    if bf16:  # an all-ones exponent is NaN or infinity
        return not ((chunk.view(np.uint16) & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(chunk).all())


def non_finite_message(folder, name, array) -> str:
    values = bf16_to_float32(array) if is_bf16(array) else array
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    return (f"{folder}: weight {name!r} {tuple(array.shape)} holds {nan} NaN and {inf} infinite value(s) among "
            f"{array.size}: the file is corrupt or was saved from a diverged model, and every caption would be "
            "NaN. Re-download it (or load(..., check_finite=False) to load it anyway)")


# The processor's files against the model's config, at load rather than at the first caption
# (where a mismatch would look like a bad prompt or image): every tokenizer id must be a row of
# the model's vocabulary, the processor must put as many <image> ids as the model has queries,
# and resize images to the size its position table was trained at.
def check_processor_fits(folder, processor, vocab_size: int, vocab_key: str, num_query_tokens: int,
                         image_size: int) -> None:
    if processor is None:
        return
    vocab = processor.tokenizer.backend.get_vocab(with_added_tokens=True)
    vocab.pop("<image>", None)  # checked against config.json's image_token_index (or stripped, retrieval)
    token, top = max(vocab.items(), key=lambda item: item[1])
    if top >= vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has id {top} ({token!r}) but config.json's {vocab_key} is "
                              f"{vocab_size}, so the model has no row for it; the tokenizer files and config.json "
                              "are from different checkpoints: re-download them together")
    if processor.num_query_tokens not in (0, num_query_tokens):
        raise CheckpointError(f"{folder}: processor_config.json has num_query_tokens {processor.num_query_tokens} but "
                              f"config.json has {num_query_tokens}; the processor would put "
                              f"{processor.num_query_tokens} <image> ids where the model fills {num_query_tokens}. "
                              "The files are from different checkpoints: re-download them together")
    images = processor.image_config
    if images.do_resize and images.shortest_edge is None and (images.height, images.width) != (image_size,) * 2:
        raise CheckpointError(f"{folder}: the image processor (preprocessor_config.json) resizes to "
                              f"{images.height}x{images.width} px but config.json's vision_config.image_size is "
                              f"{image_size}; the files are from different checkpoints: re-download them together")


# Processor files without a tokenizer: the folder meant to have one, so say so at load instead of
# loading a model that cannot caption. (A folder with none of them loads for arrays only.)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "merges.txt", "spiece.model")


def check_tokenizer_present(folder, has_tokenizer: bool) -> None:
    present = [name for name in PROCESSOR_FILES if (Path(folder) / name).is_file()]
    if present and not has_tokenizer:
        raise CheckpointError(f"{folder} has {', '.join(present)} but no tokenizer (tokenizer.json, vocab.json + "
                              "merges.txt, or vocab.txt), so its processor cannot be built: download the tokenizer "
                              "files with the checkpoint (see weights/README.md)")


# Safetensors where the folder has them (as transformers prefers them); else pytorch_model.bin,
# which some BLIP checkpoints have alone on the hub's main branch.
def read_as_stored(folder, progress=True):  # -> {name: array as stored}
    folder = Path(folder)
    has_safetensors = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
    if not has_safetensors and any((folder / name).is_file() for name in TORCH_FILES):
        return load_torch_checkpoint(folder)
    return load_checkpoint(folder, dtype=None, progress=progress)
