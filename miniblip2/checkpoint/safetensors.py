"""Checkpoint I/O: read safetensors by hand, check coverage, and nest the names for the model.

A safetensors file (https://huggingface.co/docs/safetensors) has three parts:

    [8 bytes]   N, the header length, unsigned little-endian
    [N bytes]   JSON: {"vision_model.post_layernorm.weight":
                           {"dtype": "F32", "shape": [1408], "data_offsets": [begin, end]},
                       ...,
                       "__metadata__": {"format": "pt"}}      (optional, strings only)
    [the rest]  raw tensor bytes, little-endian, row-major; begin/end count from here

There is no pickle and no code in it: a tensor is a dtype, a shape and a byte range. So we
memory-map the file and hand out `np.frombuffer` views. Nothing is read until the math touches
it, and an F32 weight *is* the file's bytes: "loading" the 15 GB of blip2-opt-2.7b takes
milliseconds, and the OS pages weights in (and out again) as the layers run.

A checkpoint folder holds one `model.safetensors`, or shards named by
`model.safetensors.index.json` ({"weight_map": {name: shard file}}). The names are kept as they
are; `nest` only splits them on "." so `w["qformer"]["encoder"]["layer"][2]["crossattention"]`
is the file's `qformer.encoder.layer.2.crossattention.*`.

Every problem with a file raises `CheckpointError` with a message that names the file, the key
and the shapes, and says what to do. Nothing here unpickles: `pytorch_model.bin` is refused.
"""

import json
import math
import mmap
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

# NumPy has no bfloat16. A BF16 tensor stays its raw 16 bits as uint16, tagged through the
# dtype's metadata so `load_checkpoint` and `save_safetensors` know they are BF16, not U16.
BF16 = np.dtype("<u2", metadata={"safetensors": "BF16"})

# safetensors dtype name -> NumPy dtype, always little-endian as the format says.
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": BF16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Weight files we recognise but will not open: pickles can run code, the others need TF/JAX.
UNSAFE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                "flax_model.msgpack")

# Show a progress bar on stderr only for loads that take a while.
PROGRESS_MIN_BYTES = 1 << 30
PROGRESS_MIN_SHARDS = 8


# ---------------------------------------------------------------------------------------------
# bfloat16 by hand: the top 16 bits of a float32.

def is_bf16(x: np.ndarray) -> bool:
    """True for a uint16 array tagged as BF16 bits (see `BF16`)."""
    return (x.dtype.metadata or {}).get("safetensors") == "BF16"


# torch.Tensor.float() on a bfloat16 tensor: exact, BF16 is float32 with a shorter mantissa.
def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 BF16 bits [...] -> float32 [...] (a new array)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


# torch.Tensor.to(torch.bfloat16) (c10 round_to_nearest_even): round, don't truncate.
def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 [...] -> uint16 BF16 bits [...], tagged `BF16` so save_safetensors writes BF16."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)  # room for the carry, no wrap-around
    # Add just under half a BF16 ulp, plus one when the kept part is odd: ties go to even.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # Rounding could carry a NaN's payload into an infinity; torch writes the canonical NaN.
    rounded = np.where(np.isnan(x), 0x7FC0, rounded)
    return rounded.astype(np.uint16).view(BF16)


# ---------------------------------------------------------------------------------------------
# One safetensors file.

# safetensors.safe_open(path, "np"): memory-map, parse the header, hand out views.
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, as read-only arrays over a memory map.

    F32/F16/F64/int/bool tensors are zero-copy views of the file; BF16 tensors are uint16 views
    with dtype `BF16` (convert with `bf16_to_float32`). The `__metadata__` entry is skipped.
    """
    path = Path(path)
    buffer = _map_file(path)
    header, data_start = _read_header(path, buffer)
    specs = {name: _tensor_spec(path, name, entry) for name, entry in header.items()}
    _check_layout(path, specs, data_size=len(buffer) - data_start)
    tensors = {}
    for name, (dtype, shape, begin, end) in specs.items():
        count = (end - begin) // dtype.itemsize
        tensors[name] = np.frombuffer(buffer, dtype, count, data_start + begin).reshape(shape)
    return tensors


def _map_file(path: Path) -> mmap.mmap:
    """Map the whole file read-only: the arrays can't scribble on a checkpoint by accident."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"{path} is {size} bytes, shorter than the 8-byte header length every "
                    "safetensors file starts with: it is not a safetensors file or it is "
                    "truncated. Download it again.")
            # Ask the kernel to start reading the whole file now, in order, in the background:
            # from a cold disk the layers then find their pages already read instead of
            # faulting them in one by one as they touch them (docs/BENCHMARKS.md, "cold start").
            # Not for a file larger than half the free memory: its end would evict its start.
            if hasattr(os, "posix_fadvise") and size < _free_memory() // 2:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            # The map keeps its own handle, so the file can be closed here.
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise CheckpointError(
            f"cannot read safetensors file {path}: {err.strerror or err}") from err


def _free_memory() -> int:
    """Bytes of memory free now, the page cache not counted (0 where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _read_header(path: Path, buffer: mmap.mmap) -> tuple[dict, int]:
    """The JSON header without `__metadata__`, and where the tensor data starts."""
    (length,) = struct.unpack("<Q", buffer[:8])
    if length > len(buffer) - 8:
        raise CheckpointError(
            f"{path} has a truncated header: the first 8 bytes say the JSON header is {length} "
            f"bytes, but the file is only {len(buffer)} bytes. The file is truncated or not a "
            "safetensors file; download it again.")
    try:
        header = json.loads(buffer[8:8 + length])
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(
            f"{path} has a header that is not valid JSON ({err}). The file is corrupt or not "
            "a safetensors file; download it again.") from err
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} has a JSON header that is a {type(header).__name__}, not an object of "
            "tensor entries. The file is corrupt or not a safetensors file.")
    header.pop("__metadata__", None)
    return header, 8 + length


def _tensor_spec(path: Path, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Check one header entry -> (dtype, shape, begin, end), offsets relative to the data."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object: {entry!r}.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype!r}, which miniblip2 cannot read. "
            f"Supported dtypes: {', '.join(DTYPES)}. Re-save the checkpoint in F32, F16 or "
            "BF16 (e.g. model.to(torch.float32).save_pretrained(...) with transformers).")
    if not _is_int_list(shape) or any(n < 0 for n in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}.")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(
            f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; expected "
            "[begin, end] with 0 <= begin <= end.")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({dtype}, shape {tuple(shape)}) should take {expected} "
            f"bytes, but its data_offsets [{begin}, {end}] span {end - begin}. The header is "
            "corrupt; download the file again.")
    return DTYPES[dtype], tuple(shape), begin, end


def _is_int_list(value) -> bool:
    # bool is an int in Python, but `true` is not a size.
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_layout(path: Path, specs: dict, data_size: int) -> None:
    """Every byte range lies inside the file, and no two tensors share bytes."""
    if specs:
        last = max(specs, key=lambda name: specs[name][3])
        needed = specs[last][3]
        if needed > data_size:
            raise CheckpointError(
                f"{path} is truncated: its header describes {needed} bytes of tensor data "
                f"(tensor {last!r} ends there), but only {data_size} are present. The download "
                "was probably interrupted; download the file again.")
    # Sorted by start, each tensor must begin at or after the end of the one before.
    ranges = sorted((begin, end, name) for name, (_, _, begin, end) in specs.items() if end > begin)
    for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < prev_end:
            raise CheckpointError(
                f"{path}: tensors {prev!r} and {name!r} overlap in the data section "
                f"(one ends at byte {prev_end}, the next starts at {begin}). The header is "
                "corrupt; download the file again.")


# safetensors.numpy.save_file: same layout; the header is padded with spaces to 8 bytes so
# every tensor starts aligned, as the reference writer does.
def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` as safetensors, readable by the `safetensors` library.

    Dtypes as in `DTYPES`; to write BF16 pass uint16 bits tagged `BF16` (from
    `float32_to_bf16(x)`, or `bits.view(BF16)` for bits you already have).
    """
    path = Path(path)
    header, arrays, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError("safetensors metadata must map strings to strings.")
        header["__metadata__"] = dict(metadata)
    for name, array in tensors.items():
        array = np.asarray(array)
        code = _dtype_code(name, array)
        # The format is little-endian and row-major whatever the array in memory is.
        array = np.asarray(array, dtype=DTYPES[code], order="C")
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    # Write next to the target, then rename: a crash never leaves a half-written checkpoint.
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for array in arrays:
                array.tofile(f)
        os.replace(partial, path)
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from err


def _dtype_code(name: str, array: np.ndarray) -> str:
    """The safetensors dtype name of an array about to be written."""
    if not isinstance(name, str) or name == "__metadata__":
        raise CheckpointError(f"cannot save a tensor named {name!r}: names must be strings "
                              "other than '__metadata__'.")
    if is_bf16(array):
        return "BF16"
    for code, dtype in DTYPES.items():
        # Compare kind and size, not byte order: big-endian arrays are swapped on write.
        same = (array.dtype.kind, array.dtype.itemsize) == (dtype.kind, dtype.itemsize)
        if same and code != "BF16":
            return code
    raise CheckpointError(
        f"cannot save tensor {name!r} of NumPy dtype {array.dtype}: safetensors dtypes "
        f"supported here are {', '.join(DTYPES)}.")


# ---------------------------------------------------------------------------------------------
# A checkpoint folder.

# PreTrainedModel.from_pretrained: model.safetensors first, else the index and its shards.
def load_checkpoint(folder: str | os.PathLike, dtype=np.float32,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder (or one .safetensors file), flat, checkpoint names.

    Floating tensors (F64/F32/F16/BF16) become `dtype` (np.float32 or np.float16; None keeps
    them as stored) only where they differ, so F32 on disk loaded as float32 stays a zero-copy,
    read-only memory map. Integer and bool tensors are left as stored.
    """
    target = _target_dtype(dtype)
    shards = _find_shards(Path(folder))
    # Map and check every file before converting anything: a bad shard fails in milliseconds.
    files = [(shard, read_safetensors(shard), names) for shard, names in shards]
    flat, origin = {}, {}
    for shard, tensors, names in files:
        check_shard(shard, tensors, names)
        for name in tensors:
            if name in origin:
                raise CheckpointError(
                    f"tensor {name!r} is in both {origin[name].name} and {shard.name}; the "
                    "shards come from different downloads. Download the checkpoint again.")
            origin[name] = shard
    total = sum(a.nbytes for _, tensors, _ in files for a in tensors.values())
    show = progress and sys.stderr.isatty() and (
        total >= PROGRESS_MIN_BYTES or len(files) >= PROGRESS_MIN_SHARDS)
    advance = _progress_bar(total) if show else (lambda nbytes: None)
    for shard, tensors, _ in files:
        for name, array in tensors.items():
            flat[name] = _to_dtype(shard, name, array, target)
            advance(array.nbytes)
    return flat


def _target_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        target = np.dtype(dtype)
    except TypeError as err:
        raise CheckpointError(f"dtype must be np.float32 or np.float16, got {dtype!r}.") from err
    if target not in (np.float32, np.float16):
        raise CheckpointError(f"dtype must be np.float32 or np.float16, got {target}.")
    return target


def _to_dtype(shard: Path, name: str, array: np.ndarray, target: np.dtype | None) -> np.ndarray:
    """Floating tensors -> target; a copy only when the dtype really changes."""
    if target is None:
        return array
    if is_bf16(array):
        array = bf16_to_float32(array)
    elif array.dtype.kind != "f":
        return array
    if array.dtype == target:
        return array
    # A weight past float16's range would silently become inf and every output NaN.
    try:
        with np.errstate(over="raise"):
            return array.astype(target)
    except FloatingPointError as err:
        raise CheckpointError(
            f"{shard}: tensor {name!r} has values beyond the {target} range "
            f"(largest magnitude {np.nanmax(np.abs(array[np.isfinite(array)])):.4g}); "
            "load it with dtype=np.float32.") from err


def _find_shards(folder: Path) -> list[tuple[Path, set[str] | None]]:
    """[(file, names the index puts in it, or None for a single file)]."""
    if folder.is_file():
        if folder.name.endswith(".safetensors"):
            return [(folder, None)]
        if folder.name.endswith(".safetensors.index.json"):
            return read_index(folder)
        if folder.name in UNSAFE_FILES or folder.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise CheckpointError(_unsafe_message(folder.parent, [folder.name]))
        raise CheckpointError(
            f"{folder} is a file but not a .safetensors file; pass the checkpoint folder.")
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist. Pass the folder that holds config.json "
            f"and {SINGLE_FILE} (or {INDEX_FILE} and its shards).")
    if (folder / SINGLE_FILE).is_file():
        return [(folder / SINGLE_FILE, None)]
    if (folder / INDEX_FILE).is_file():
        return read_index(folder / INDEX_FILE)
    unsafe = [name for name in UNSAFE_FILES if (folder / name).is_file()]
    if unsafe:
        raise CheckpointError(_unsafe_message(folder, unsafe))
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{folder} has no {SINGLE_FILE} or {INDEX_FILE} "
        f"({'it is empty' if not found else 'it holds: ' + ', '.join(found[:10])}"
        f"{' ...' if len(found) > 10 else ''}). Download the model's safetensors files into it, "
        "e.g. `hf download Salesforce/blip2-opt-2.7b --local-dir <folder>`.")


def _unsafe_message(folder: Path, unsafe: list[str]) -> str:
    return (
        f"{folder} holds only {', '.join(unsafe)}, not safetensors. miniblip2 never loads "
        "pickled checkpoints (pytorch_model.bin): unpickling a file can run arbitrary code. "
        "Convert it once to safetensors with transformers, where you trust the file:\n\n"
        "    from transformers import Blip2ForConditionalGeneration, Blip2Processor\n"
        f"    Blip2ForConditionalGeneration.from_pretrained('{folder}').save_pretrained("
        f"'{folder}-safetensors', safe_serialization=True)\n"
        f"    Blip2Processor.from_pretrained('{folder}').save_pretrained("
        f"'{folder}-safetensors')\n\n"
        "(safe_serialization=True matters on transformers 4; 5 always writes safetensors), "
        f"then load '{folder}-safetensors'. Many hub models also have a bot-converted "
        "safetensors version on a refs/pr/N revision.")


def read_index(index: Path) -> list[tuple[Path, set[str]]]:
    """model.safetensors.index.json (or pytorch_model.bin.index.json) -> [(shard file, the names
    it should hold)]."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except OSError as err:
        raise CheckpointError(f"cannot read {index}: {err.strerror or err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{index} is not a valid index (expected JSON with a \"weight_map\" "
            f"object of tensor name -> shard file): {err!r}. Download it again.") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: \"weight_map\" must map tensor names to shard file names.")
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    result = []
    for shard, names in shards.items():
        # The index names files next to it, never elsewhere on disk.
        if Path(shard).name != shard:
            raise CheckpointError(f"{index} names shard {shard!r}, which is not a plain file name.")
        if not (index.parent / shard).is_file():
            raise CheckpointError(
                f"shard {shard} named by {index} is missing ({len(names)} tensors are in it, "
                f"e.g. {min(names)!r}). Download it into {index.parent}.")
        result.append((index.parent / shard, names))
    return result


def check_shard(shard: Path, tensors: dict, names: set[str] | None, index_file: str = INDEX_FILE) -> None:
    """A shard holds exactly the names its index says: a mismatch means mixed downloads."""
    if names is None:
        return
    for problem, wrong in (("says it holds, but it does not have", names - tensors.keys()),
                           ("does not list, but it holds", tensors.keys() - names)):
        if wrong:
            raise CheckpointError(
                f"{shard}: {len(wrong)} tensor(s) that {index_file} {problem}: {_some(sorted(wrong))}. "
                "The shard and the index come from different versions; download both again.")


# A tqdm-like bar drawn by hand: one stderr line redrawn with "\r", no dependency.
def _progress_bar(total: int, width: int = 30):
    """Return advance(nbytes), which redraws the bar at most ten times a second."""
    start, done, drawn = time.monotonic(), 0, 0.0

    def advance(nbytes: int) -> None:
        nonlocal done, drawn
        done += nbytes
        now = time.monotonic()
        if now - drawn < 0.1 and done < total:
            return
        drawn = now
        fraction = done / total if total else 1.0
        bar = "#" * int(fraction * width)
        speed = done / max(now - start, 1e-9) / 1e9
        sys.stderr.write(f"\rloading weights {fraction:4.0%} |{bar:-<{width}}| "
                         f"{done / 1e9:.1f}/{total / 1e9:.1f} GB {speed:.1f} GB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return advance


# ---------------------------------------------------------------------------------------------
# Coverage and nesting.

# PreTrainedModel.from_pretrained's missing / unexpected / mismatched-size report, but an
# error instead of a warning: a randomly initialised weight would silently give nonsense.
def check_weights(flat: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                  tied: dict[str, str] = {}, ignored_prefixes=()) -> dict[str, np.ndarray]:
    """Check `flat` against the model's `expected` {name: shape}; return it, ties filled in.

    `tied` maps a name that may be absent to the name it shares storage with
    (OPT's "language_model.lm_head.weight" -> "...decoder.embed_tokens.weight"): an absent one
    is filled from its source (the same array, no copy); a present one is kept. Raises one
    CheckpointError listing every missing name, wrong shape (name, expected, found) and name
    no expected entry uses. Unused names starting with one of `ignored_prefixes` are allowed
    and dropped from the result.
    """
    weights = dict(flat)
    for name, source in tied.items():
        if name not in weights and source in weights:
            weights[name] = weights[source]
    missing = [name for name in expected if name not in weights]
    wrong = [f"{name}: expected {tuple(shape)}, found {tuple(weights[name].shape)}"
             for name, shape in expected.items()
             if name in weights and tuple(weights[name].shape) != tuple(shape)]
    unused = [name for name in flat if name not in expected]
    ignored = [name for name in unused if name.startswith(tuple(ignored_prefixes))]
    unused = [name for name in unused if name not in ignored]
    problems = []
    if missing:
        problems.append(f"missing: {len(missing)} of the {len(expected)} weights the model "
                        f"needs{_lines(missing)}")
    if wrong:
        problems.append(f"wrong shape: {len(wrong)} weight(s){_lines(wrong)}")
    if unused:
        problems.append(f"unused: {len(unused)} weight(s) in the checkpoint that the model does "
                        f"not use{_lines(unused)}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not match the model.\n" + "\n".join(problems) +
            "\nCheck that config.json belongs to these weights and that the checkpoint is a "
            "complete Blip2ForConditionalGeneration checkpoint.")
    for name in ignored:
        del weights[name]
    return weights


def _lines(items: list[str], limit: int = 10) -> str:
    """An indented list of the first `limit` items and a count of the rest."""
    text = "".join(f"\n    {item}" for item in items[:limit])
    return text + (f"\n    ... and {len(items) - limit} more" if len(items) > limit else "")


def _some(items: list[str], limit: int = 10) -> str:
    """The first `limit` items on one line and a count of the rest."""
    text = ", ".join(repr(item) for item in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


# nn.Module.get_submodule: "qformer.encoder.layer.2.crossattention" walks the same path, with
# nn.ModuleList children named "0", "1", ... becoming list entries.
def nest(flat: dict[str, np.ndarray]) -> dict:
    """{"a.b.0.weight": x} -> {"a": {"b": [{"weight": x}]}}; arrays are not copied or renamed.

    Numbered parts become list indices; the numbers under one path must run 0..N-1.
    """
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(
                    f"checkpoint key {name!r} continues past {'.'.join(parents[:depth + 1])!r}, "
                    "which is itself a tensor: the names cannot be nested.")
        if leaf in node:
            raise CheckpointError(
                f"checkpoint key {name!r} is both a tensor and the prefix of other keys (or "
                "appears twice): the names cannot be nested.")
        node[leaf] = value
    return _to_lists(tree, "")


def _to_lists(node, path: str):
    """Turn every dict whose keys are all numbers into a dense list, bottom-up."""
    if not isinstance(node, dict):
        return node
    children = {key: _to_lists(child, f"{path}{key}.") for key, child in node.items()}
    numbered = [key for key in children if _is_index(key)]
    if not numbered:
        return children
    where = path.rstrip(".") or "the top level"
    if len(numbered) != len(children):
        raise CheckpointError(
            f"checkpoint keys under {where!r} mix numbered and named parts "
            f"({_some(sorted(children, key=str))}): they cannot form a list.")
    items = {int(key): child for key, child in children.items()}
    gaps = [str(i) for i in range(max(items) + 1) if i not in items]
    if gaps:
        raise CheckpointError(
            f"checkpoint keys under {where!r} are numbered up to {max(items)}, but "
            f"{len(gaps)} index(es) are missing: {', '.join(gaps[:10])}"
            f"{' ...' if len(gaps) > 10 else ''} (no key starts with {path + gaps[0] + '.'!r}). "
            "A layer is missing from the checkpoint; download it again or check that it is "
            "complete.")
    return [items[i] for i in range(len(items))]


def _is_index(part: str) -> bool:
    # "2" is a list index; "02" or "²" are names (and would make the numbering ambiguous).
    return part.isascii() and part.isdigit() and part == str(int(part))
