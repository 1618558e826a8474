"""Read PyTorch's `pytorch_model.bin` by hand: no torch, and nothing in the file gets to run.

`torch.save(model.state_dict(), "pytorch_model.bin")` (PyTorch >= 1.6) writes an uncompressed
zip. Every entry sits under one folder, `<prefix>`, named after the file:

    <prefix>/data.pkl          a pickle of the state dict, tensors left out (see below)
    <prefix>/data/0, data/1    raw little-endian bytes of each storage, one file per storage
    <prefix>/byteorder         b"little" (torch >= 1.12 writes it; older files are little too)
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id

A pickle is a tiny stack program, and its GLOBAL opcode imports any Python name it likes: a
pickle can say "call os.system('...')" as easily as "make an OrderedDict". What torch 2.13
writes for a state dict uses only these globals (`python -m pickletools data.pkl` shows them):

    collections.OrderedDict               the state dict itself
    torch._utils._rebuild_tensor_v2       (storage, offset, size, stride, requires_grad, hooks)
    torch._utils._rebuild_parameter       an nn.Parameter around such a tensor
    torch.FloatStorage, torch.HalfStorage, torch.BFloat16Storage, torch.LongStorage, ...
                                          the storage's dtype, inside a persistent id:
                                          ("storage", torch.FloatStorage, "0", "cpu", numel)

The persistent id is how torch leaves the bytes out of the pickle: "0" is the storage file
`data/0`, and `numel` its element count. Several tensors can point at one storage (tied
weights, a transposed view, a slice with an offset). Dtypes that never had a storage class
(uint16/32/64, float8) are written differently: a byte storage, torch.storage.UntypedStorage,
and `torch._utils._rebuild_tensor_v3`, whose extra argument is the dtype (GLOBAL torch.uint16).
We read the uint ones; NumPy has no float8.

So we do what `torch.load(weights_only=True, mmap=True)` does, without torch: a
`pickle.Unpickler` whose `find_class` answers exactly those names, each with a small function
of ours that builds a NumPy array, and refuses every other name before anything is called.
Storages are `np.frombuffer` views of the memory-mapped zip (torch stores entries uncompressed
and 64-byte aligned), and each tensor is an `as_strided` view of its storage: nothing is
copied, and tensors that share a storage share bytes. BF16 comes out as uint16 bits tagged
`BF16`, as in safetensors.py.

A sharded checkpoint has `pytorch_model.bin.index.json` ({"weight_map": {name: shard file}})
and shards `pytorch_model-00001-of-00002.bin`, ... read one by one.

Every problem with a file raises `CheckpointError` naming the file and what was found.
"""

import io
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .safetensors import BF16, check_shard, read_index

SINGLE_FILE = "pytorch_model.bin"
INDEX_FILE = "pytorch_model.bin.index.json"

# torch.<Name>Storage -> the NumPy dtype of its elements, little-endian as torch writes them.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": BF16,
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

# torch.<dtype> (as _rebuild_tensor_v3 names them) -> NumPy dtype.
TENSOR_DTYPES = {
    "float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
    "bfloat16": BF16, "int64": np.dtype("<i8"), "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "int8": np.dtype("i1"), "uint64": np.dtype("<u8"),
    "uint32": np.dtype("<u4"), "uint16": np.dtype("<u2"), "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

# The first object of torch's legacy (pre-zip) format: torch.serialization.MAGIC_NUMBER.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# A zip local file header: signature, versions, flags, method, time, date, crc, sizes, and the
# lengths of the name and the extra field that come between it and the data.
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
LOCAL_SIGNATURE = 0x04034B50


# ---------------------------------------------------------------------------------------------
# What the pickle may name: each allowed global is a function of ours or a dtype tag.

# Pickle's BUILD opcode sets attributes on any object on its stack, even a frozen dataclass or
# a function (its __defaults__). Refusing __setstate__ keeps a storage's bounds, a dtype tag and
# our rebuild functions what we made them, for this load and every later one.
class Sealed:
    def __setstate__(self, state):
        raise ValueError(f"the pickle tries to modify a {type(self).__name__}")


@dataclass(frozen=True)
class DtypeTag(Sealed):
    """What `torch.FloatStorage`, `torch.storage.UntypedStorage` or `torch.uint16` stand for
    here: just an element dtype (bytes for the untyped storage)."""
    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class Storage(Sealed):
    """One storage file `data/<key>` as a 1-D array over the map. Only `persistent_load` makes
    these, so a hostile pickle cannot pass a short or strided array off as a storage."""
    key: str
    data: np.ndarray


@dataclass(frozen=True)
class Rebuild(Sealed):
    """One of the functions below, as the pickle sees it."""
    function: object

    def __call__(self, *args):
        return self.function(*args)


# torch._utils._rebuild_tensor_v2: a view of `size` with `stride` (in elements) starting at
# element `offset` of the storage. torch strides are never negative; 0 repeats an element.
def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                   metadata=None) -> np.ndarray:
    """Storage + (offset, size, stride) -> a read-only view [*size] of the storage's bytes."""
    if not isinstance(storage, Storage):
        raise TypeError(f"a tensor is built on a {type(storage).__name__}, not on a storage")
    if not (_is_int(offset) and _is_int_tuple(size) and _is_int_tuple(stride)
            and len(size) == len(stride) and offset >= 0 and min(size + stride, default=0) >= 0):
        raise ValueError(f"tensor on storage {storage.key!r} has an invalid layout: offset "
                         f"{offset!r}, size {size!r}, stride {stride!r}")
    data = storage.data
    if 0 in size:  # an empty tensor reads nothing
        return data[:0].reshape(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    # as_strided trusts us blindly: check the last element really lies inside the storage.
    if last >= len(data):
        raise ValueError(f"tensor of size {tuple(size)}, stride {tuple(stride)} at offset "
                         f"{offset} reaches element {last} of storage {storage.key!r}, which "
                         f"has only {len(data)}")
    strides = [s * data.itemsize for s in stride]
    return np.lib.stride_tricks.as_strided(data[offset:], size, strides, writeable=False)


# torch._utils._rebuild_tensor_v3: the same on an untyped (byte) storage, dtype given apart.
def rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                      metadata=None) -> np.ndarray:
    """Byte storage + dtype + (offset, size, stride) in elements -> a read-only view [*size]."""
    if not isinstance(storage, Storage) or storage.data.dtype != np.uint8:
        raise ValueError(f"a v3 tensor is built on a {type(storage).__name__}, not on a byte "
                         "storage")
    if not isinstance(dtype, DtypeTag) or dtype.name not in TENSOR_DTYPES:
        raise ValueError(f"a v3 tensor has dtype {dtype!r}, not a torch dtype")
    whole = len(storage.data) // dtype.dtype.itemsize * dtype.dtype.itemsize
    typed = Storage(storage.key, storage.data[:whole].view(dtype.dtype))
    return rebuild_tensor(typed, offset, size, stride)


# torch._utils._rebuild_parameter(_with_state): an nn.Parameter is just its tensor to us.
def rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise TypeError(f"a parameter wraps a {type(data).__name__}, not a tensor")
    return data


ALLOWED_GLOBALS = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor_v2": Rebuild(rebuild_tensor),
    "torch._utils._rebuild_tensor_v3": Rebuild(rebuild_tensor_v3),
    "torch._utils._rebuild_parameter": Rebuild(rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": Rebuild(rebuild_parameter),
    **{f"torch.{name}": DtypeTag(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    "torch.storage.UntypedStorage": DtypeTag("UntypedStorage", np.dtype("u1")),
    "torch.UntypedStorage": DtypeTag("UntypedStorage", np.dtype("u1")),
    **{f"torch.{name}": DtypeTag(name, dtype) for name, dtype in TENSOR_DTYPES.items()},
}


# torch._weights_only_unpickler.Unpickler, cut down to what a state dict needs.
class StateDictUnpickler(pickle.Unpickler):
    """Unpickle with `ALLOWED_GLOBALS` only; storages come from `storage(key) -> bytes view`."""

    def __init__(self, file, path: Path, storage=None):
        super().__init__(file)
        self.path, self.storage, self.storages = path, storage, {}

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get(f"{module}.{name}")
        if allowed is None and module == "torch" and _looks_like_dtype(name):
            raise CheckpointError(
                f"{self.path} holds tensors of type torch.{name}, which miniblip2 cannot read "
                f"(it reads torch.{', torch.'.join(TENSOR_DTYPES)}). Convert the weights to "
                "float32, float16 or bfloat16 where you trust the file, and save them again.")
        if allowed is None:
            raise CheckpointError(
                f"{self.path} was not loaded: its pickle asks for the Python global "
                f"{module}.{name}, which has no place in a PyTorch state dict. Unpickling it "
                "would run code chosen by whoever made the file, so miniblip2 stopped before "
                "anything ran. A pytorch_model.bin of weights names only torch storages, "
                "torch._utils._rebuild_tensor_v2 / _rebuild_parameter and "
                "collections.OrderedDict. Do not torch.load this file unless you trust its "
                "source; use the model's safetensors files instead.")
        return allowed

    # ("storage", torch.FloatStorage, "0", "cpu", numel) -> Storage over data/0.
    def persistent_load(self, pid) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], DtypeTag) and isinstance(pid[2], str)
                and _is_int(pid[4]) and pid[4] >= 0):
            raise ValueError(f"unknown persistent id {str(pid)[:200]}")
        _, kind, key, _location, numel = pid
        if self.storage is None:
            raise CheckpointError(_legacy_message(self.path))
        if key not in self.storages:
            data = self.storage(key)
            if len(data) < numel * kind.dtype.itemsize:
                raise ValueError(f"storage data/{key} holds {len(data)} bytes, but "
                                 f"{numel} x {kind.name} need {numel * kind.dtype.itemsize}")
            self.storages[key] = Storage(key, np.frombuffer(data, kind.dtype, numel))
        storage = self.storages[key]
        if storage.data.dtype != kind.dtype:
            raise ValueError(f"storage data/{key} is read both as {storage.data.dtype} and as "
                             f"{kind.name}")
        return storage


def _looks_like_dtype(name: str) -> bool:
    """torch.ComplexFloatStorage, torch.float8_e4m3fn, ...: a dtype we lack, not an attack."""
    return name.endswith("Storage") or name.startswith(
        ("float", "bfloat", "int", "uint", "complex", "bits", "qint", "quint"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(_is_int(v) for v in value)


# ---------------------------------------------------------------------------------------------
# One pytorch_model.bin.

# torch.load(path, weights_only=True, mmap=True), NumPy out.
def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one torch.save zip file, as read-only arrays over a memory map.

    Same dtypes as `read_safetensors` (BF16 as tagged uint16 bits); tensors that share a
    storage in the file share memory here. Refuses, before running anything, any pickle that
    names a global outside `ALLOWED_GLOBALS`, and the legacy non-zip format.
    """
    path = Path(path)
    buffer = _map_file(path)
    entries = _zip_entries(path, buffer)
    prefix = _record_prefix(path, entries)
    byteorder = entries.get(f"{prefix}/byteorder")
    if byteorder is not None and bytes(_entry(path, buffer, byteorder)) != b"little":
        raise CheckpointError(
            f"{path} was saved on a big-endian machine (its byteorder record says "
            f"{bytes(_entry(path, buffer, byteorder))[:20]!r}); miniblip2 reads little-endian "
            "tensors only. Load it with torch there and save it again with safetensors.")

    def storage(key: str) -> memoryview:
        info = entries.get(f"{prefix}/data/{key}")
        if info is None:
            raise ValueError(f"it refers to storage {key!r}, but {prefix}/data/{key} is missing")
        return _entry(path, buffer, info)

    pickled = bytes(_entry(path, buffer, entries[f"{prefix}/data.pkl"]))
    state = _unpickle(path, io.BytesIO(pickled), storage, f"{prefix}/data.pkl")
    return _tensors_only(path, state)


def _map_file(path: Path) -> mmap.mmap:
    """Map the whole file read-only, once: every tensor is a view of this one map."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CheckpointError(f"{path} is empty (0 bytes). Download it again.")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err


def _zip_entries(path: Path, buffer: mmap.mmap) -> dict[str, zipfile.ZipInfo]:
    """{entry name: ZipInfo} from the zip's central directory; non-zips are explained."""
    try:
        with zipfile.ZipFile(buffer) as archive:  # reads the map; does not close it
            return {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, struct.error) as err:
        problem = err
    # Outside the except: a hostile pickle found below is reported on its own.
    raise CheckpointError(_not_a_zip_message(path, buffer, problem))


def _record_prefix(path: Path, entries: dict) -> str:
    """The one folder torch put everything in: "archive", "pytorch_model", ..."""
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        names = sorted(entries)
        raise CheckpointError(
            f"{path} is a zip but not a torch.save checkpoint: it should hold exactly one "
            f"<folder>/data.pkl, and it holds {len(pickles)} (its entries: "
            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}).")
    return pickles[0].split("/")[0]


def _entry(path: Path, buffer: mmap.mmap, info: zipfile.ZipInfo) -> memoryview:
    """The bytes of one stored zip entry, as a view of the map (no copy)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{path}: zip entry {info.filename} is compressed (method {info.compress_type}); "
            "torch.save stores entries uncompressed so they can be memory-mapped. The file was "
            "re-zipped by some other tool: load it with torch where you trust it and save it "
            "again with torch.save, or convert it to safetensors.")
    at = info.header_offset
    if at + LOCAL_HEADER.size > len(buffer):
        raise CheckpointError(_truncated_message(path, info, len(buffer)))
    signature, *_, name_length, extra_length = LOCAL_HEADER.unpack_from(buffer, at)
    if signature != LOCAL_SIGNATURE:
        raise CheckpointError(
            f"{path}: zip entry {info.filename} has no local header at byte {at} (found "
            f"{signature:#010x}). The file is corrupt; download it again.")
    # The extra field is torch's padding that aligns the data to 64 bytes.
    start = at + LOCAL_HEADER.size + name_length + extra_length
    if start + info.file_size > len(buffer):
        raise CheckpointError(_truncated_message(path, info, len(buffer)))
    return memoryview(buffer)[start:start + info.file_size]


def _truncated_message(path: Path, info: zipfile.ZipInfo, size: int) -> str:
    return (f"{path} is truncated or corrupt: zip entry {info.filename} ({info.file_size} "
            f"bytes at byte {info.header_offset}) runs past the end of the {size}-byte file. "
            "Download it again.")


def _unpickle(path: Path, file, storage, what: str):
    """Run the allowlist unpickler; any failure other than ours means a corrupt pickle."""
    try:
        return StateDictUnpickler(file, path, storage).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 the bytes are untrusted: any error means corrupt
        raise CheckpointError(
            f"{path}: {what} is not a valid torch state dict pickle ({type(err).__name__}: "
            f"{err}). The file is corrupt or was not written by torch.save; download it "
            "again.") from None


def _tensors_only(path: Path, state) -> dict[str, np.ndarray]:
    """A state dict is {name: tensor}; a training checkpoint or a whole model is not."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a pickled {type(state).__name__}, not a state dict "
            "({name: tensor}). Save model.state_dict() (or use save_pretrained).")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{path} is not a plain state dict: entry {name!r} is a "
                f"{type(value).__name__}, not a tensor (a training checkpoint with optimizer "
                "state, or weights nested under a key?). Save model.state_dict() itself.")
    return dict(state)


def _not_a_zip_message(path: Path, buffer: mmap.mmap, err: Exception) -> str:
    """Why a file that should be a torch zip is not: cut short, an LFS pointer, or a pickle."""
    head = buffer[:64]
    if head.startswith(b"PK"):
        return (f"{path} is truncated or corrupt: it starts like a zip, but its central "
                f"directory at the end is missing or broken ({err}). The download was probably "
                "interrupted; download it again.")
    if head.startswith(b"version https://git-lfs"):
        return (f"{path} is a Git LFS pointer ({len(buffer)} bytes), not the weights: the "
                "repository was cloned without LFS. Run `git lfs pull` in it, or download "
                "with `hf download`.")
    if not head.startswith(b"\x80"):  # the PROTO opcode that torch's pickles start with
        return (f"{path} is not a PyTorch checkpoint: it is neither a zip (torch.save) nor a "
                f"pickle; it starts with {bytes(head[:16])!r}. Download it again.")
    # A pickle on its own: torch's legacy format, or something else. Read the first object
    # with the same allowlist, so a hostile pickle is named and still nothing runs.
    buffer.seek(0)
    first = _unpickle(path, buffer, None, "the pickle")
    if _is_int(first) and first == LEGACY_MAGIC:
        return _legacy_message(path)
    return (f"{path} is a bare pickle (of a {type(first).__name__}), not the zip file "
            "torch.save writes. miniblip2 reads torch.save(state_dict) files only; convert the "
            "weights to safetensors where you trust the file.")


def _legacy_message(path: Path) -> str:
    return (f"{path} is in PyTorch's legacy serialization format (torch < 1.6, or "
            "_use_new_zipfile_serialization=False), which miniblip2 does not read. Re-save it "
            "where you trust the file, with torch.save(torch.load(f), f) on torch >= 1.6, or "
            "better convert it to safetensors: "
            "safetensors.torch.save_file(torch.load(f), 'model.safetensors').")


# ---------------------------------------------------------------------------------------------
# A checkpoint folder: one pytorch_model.bin, or shards listed by pytorch_model.bin.index.json.

# transformers' load_state_dict / load_sharded_checkpoint for .bin weights.
def load_torch_checkpoint(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a folder's pytorch_model.bin (or its shards), flat, checkpoint names.

    `folder` may also be one .bin file or the index file. Tensors are as `read_torch_bin`
    returns them: as stored, zero-copy, read-only.
    """
    flat, origin = {}, {}
    for shard, names in _find_shards(Path(folder)):
        tensors = read_torch_bin(shard)
        check_shard(shard, tensors, names, INDEX_FILE)
        for name, array in tensors.items():
            if name in origin:
                raise CheckpointError(
                    f"tensor {name!r} is in both {origin[name].name} and {shard.name}; the "
                    "shards come from different downloads. Download the checkpoint again.")
            origin[name], flat[name] = shard, array
    return flat


def _find_shards(folder: Path) -> list[tuple[Path, set[str] | None]]:
    """[(file, names the index puts in it, or None for a single file)]."""
    if folder.is_file():
        return read_index(folder) if folder.name.endswith(".index.json") else [(folder, None)]
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist. Pass the folder that holds "
            f"{SINGLE_FILE} (or {INDEX_FILE} and its shards).")
    if (folder / SINGLE_FILE).is_file():
        return [(folder / SINGLE_FILE, None)]
    if (folder / INDEX_FILE).is_file():
        return read_index(folder / INDEX_FILE)
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{folder} has no {SINGLE_FILE} or {INDEX_FILE} "
        f"({'it is empty' if not found else 'it holds: ' + ', '.join(found[:10])}"
        f"{' ...' if len(found) > 10 else ''}).")
