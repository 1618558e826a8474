"""miniblip2.checkpoint.torch_bin against real torch.save files, and against hostile ones.

Every comparison of tensors is exact (tolerance 0, bit for bit): reading a torch zip only
moves bytes, so any difference is a bug. Every hostile file must raise CheckpointError naming
the file and the culprit, and the payload must not have run: each payload touches a marker
file, and the test checks that plain `pickle.loads` *would* have touched it, so the check can
fail.
"""

import io
import json
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from miniblip2.checkpoint.safetensors import BF16, is_bf16
from miniblip2.checkpoint.torch_bin import load_torch_checkpoint, read_torch_bin
from miniblip2.errors import CheckpointError


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    """What read_torch_bin should give for `tensor`: the same values, BF16 as tagged bits."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16)
    return tensor.numpy()


def same_bits(ours: np.ndarray, tensor: torch.Tensor) -> bool:
    """Equal dtype (BF16 tag included), shape and bytes: NaN == NaN and -0.0 != 0.0."""
    expected = numpy_of(tensor)
    return (ours.dtype == expected.dtype and is_bf16(ours) == is_bf16(expected)
            and ours.shape == expected.shape and ours.tobytes() == expected.tobytes())


def state_dict() -> OrderedDict:
    """Every dtype a BLIP checkpoint has, plus the layouts that are not one contiguous block."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g)
    return OrderedDict([
        ("f32", torch.randn(3, 4, generator=g)),
        ("f16", torch.randn(2, 7, generator=g).half()),
        ("bf16", torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("nan"), 1e-40,
                               3e38]).to(torch.bfloat16)),
        ("f64", torch.randn(3, generator=g, dtype=torch.float64)),
        ("position_ids", torch.arange(12).expand(1, -1)),  # int64, as BLIP's buffers are
        ("mask", torch.rand(2, 3, generator=g) > 0.5),
        ("i32", torch.arange(-3, 3, dtype=torch.int32)),
        ("u8", torch.arange(250, 256, dtype=torch.uint8)),
        ("scalar", torch.tensor(1.5)),
        ("empty", torch.zeros(0, 4)),
        ("weight", weight),
        ("transposed", weight.t()),  # shares weight's storage, strides (1, 5)
        ("rows", weight[2:5]),  # shares it too, storage offset 10
        ("strided", weight[::2, 1:4]),  # step 2 in rows, offset 1
        ("param", torch.nn.Parameter(torch.randn(4, generator=g))),
    ])


def test_every_dtype_and_layout_bit_exact(tmp_path):
    expected = state_dict()
    torch.save(expected, tmp_path / "pytorch_model.bin")
    ours = read_torch_bin(tmp_path / "pytorch_model.bin")
    assert list(ours) == list(expected)
    for name, tensor in expected.items():
        assert same_bits(ours[name], tensor), name
        assert not ours[name].flags.writeable, name  # a read-only view of the map


def test_tensors_sharing_a_storage_share_memory(tmp_path):
    torch.save(state_dict(), tmp_path / "w.bin")
    ours = read_torch_bin(tmp_path / "w.bin")
    for view in ("transposed", "rows", "strided"):
        assert np.shares_memory(ours["weight"], ours[view]), view
    np.testing.assert_array_equal(ours["transposed"], ours["weight"].T)
    np.testing.assert_array_equal(ours["rows"], ours["weight"][2:5])
    np.testing.assert_array_equal(ours["strided"], ours["weight"][::2, 1:4])
    assert not np.shares_memory(ours["f32"], ours["weight"])


def test_dtypes_without_a_storage_class(tmp_path):
    """uint16/32/64 are saved as a byte storage + _rebuild_tensor_v3 + GLOBAL torch.uint16."""
    base = torch.arange(60000, 60012, dtype=torch.int32).to(torch.uint16).reshape(3, 4)
    expected = {"u16": base, "u16_t": base.t()[1:],
                "u32": torch.tensor([0, 1, 2**32 - 1], dtype=torch.uint32),
                "u64": torch.tensor([2**63 + 5], dtype=torch.uint64)}
    torch.save(expected, tmp_path / "w.bin")
    assert b"_rebuild_tensor_v3" in (tmp_path / "w.bin").read_bytes()  # the path under test
    ours = read_torch_bin(tmp_path / "w.bin")
    for name, tensor in expected.items():
        assert ours[name].dtype == {"u16": np.uint16, "u32": np.uint32, "u64": np.uint64}[
            name[:3]] and ours[name].tobytes() == tensor.contiguous().numpy().tobytes(), name
    assert np.shares_memory(ours["u16"], ours["u16_t"])


@pytest.mark.parametrize("dtype, culprit", [(torch.float8_e4m3fn, "torch.float8_e4m3fn"),
                                            (torch.complex64, "torch.ComplexFloatStorage")])
def test_dtypes_numpy_cannot_hold(tmp_path, dtype, culprit):
    torch.save({"w": torch.zeros(2, dtype=dtype)}, tmp_path / "w.bin")
    with pytest.raises(CheckpointError, match=rf"w.bin holds tensors of type {culprit}"):
        read_torch_bin(tmp_path / "w.bin")


def tiny_blip() -> BlipForConditionalGeneration:
    text = {"vocab_size": 99, "hidden_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 37, "max_position_embeddings": 40,
            "pad_token_id": 0, "bos_token_id": 1, "sep_token_id": 2, "eos_token_id": 2}
    vision = {"hidden_size": 20, "intermediate_size": 33, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 24, "patch_size": 8}
    torch.manual_seed(0)
    return BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_whole_transformers_model_bit_exact(tmp_path, dtype):
    expected = tiny_blip().to(dtype).state_dict()
    torch.save(expected, tmp_path / "pytorch_model.bin")
    ours = load_torch_checkpoint(tmp_path)
    assert list(ours) == list(expected)
    for name, tensor in expected.items():
        assert same_bits(ours[name], tensor), name
    # The LM head is tied to the word embeddings: one storage in the file, one buffer here.
    tied = ["text_decoder.bert.embeddings.word_embeddings.weight",
            "text_decoder.cls.predictions.decoder.weight"]
    assert expected[tied[0]].data_ptr() == expected[tied[1]].data_ptr()
    assert np.shares_memory(ours[tied[0]], ours[tied[1]])


def test_sharded_index(tmp_path):
    expected = tiny_blip().state_dict()
    names = list(expected)
    shards = {"pytorch_model-00001-of-00002.bin": names[:40],
              "pytorch_model-00002-of-00002.bin": names[40:]}
    for shard, part in shards.items():
        torch.save({name: expected[name] for name in part}, tmp_path / shard)
    weight_map = {name: shard for shard, part in shards.items() for name in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    for where in (tmp_path, tmp_path / "pytorch_model.bin.index.json"):
        ours = load_torch_checkpoint(where)
        assert sorted(ours) == sorted(expected)
        assert all(same_bits(ours[name], tensor) for name, tensor in expected.items())


def test_sharded_index_problems(tmp_path):
    torch.save({"a": torch.ones(2), "b": torch.zeros(2)}, tmp_path / "shard1.bin")
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "shard1.bin", "c": "shard2.bin"}}))
    with pytest.raises(CheckpointError, match="shard2.bin.*missing.*'c'"):
        load_torch_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "shard1.bin"}}))
    with pytest.raises(CheckpointError, match=r"shard1.bin: 1 tensor.*does not list.*'b'"):
        load_torch_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "../shard1.bin"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_torch_checkpoint(tmp_path)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid index"):
        load_torch_checkpoint(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"has no pytorch_model.bin.*config.json"):
        load_torch_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torch_checkpoint(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Hostile and broken files.

def torch_zip(path, pickled: bytes, storages: dict[str, bytes] | None = None,
              byteorder=b"little", compression=zipfile.ZIP_STORED):
    """A zip laid out as torch.save lays it out, with whatever pickle we like in it."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled, compress_type=compression)
        archive.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data, compress_type=compression)
        archive.writestr("archive/version", b"3\n")
    return path


def torch_entries(obj) -> tuple[bytes, dict[str, bytes]]:
    """torch.save(obj) -> (its data.pkl, {storage key: bytes}), to re-zip as we like."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        files = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    return files["data.pkl"], {k[5:]: v for k, v in files.items() if k.startswith("data/")}


class RunsShell:
    """Unpickling this runs `touch marker` through os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class RunsEval:
    """Unpickling this evals an expression that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({self.marker!r}).touch()",)


# The culprit as the message must name it: protocol 2 writes builtins as __builtin__ and
# os.system as posix.system; a name is what the pickle says, not what Python would import.
PAYLOADS = {
    "os.system": (RunsShell, "posix.system", 2),
    "os.system, protocol 4": (RunsShell, "posix.system", 4),
    "builtins.eval": (RunsEval, "__builtin__.eval", 2),
    "builtins.eval, protocol 4": (RunsEval, "builtins.eval", 4),
}


def hostile_pickle(kind, marker) -> bytes:
    cls, _, protocol = PAYLOADS[kind]
    return pickle.dumps({"weight": [1.0], "evil": cls(marker)}, protocol=protocol)


@pytest.mark.parametrize("wrapping", ["torch zip", "torch.save", "bare pickle"])
@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_code_in_the_pickle_never_runs(tmp_path, kind, wrapping):
    marker, culprit = tmp_path / "ran", PAYLOADS[kind][1]
    path = tmp_path / "pytorch_model.bin"
    if wrapping == "torch zip":  # next to a real tensor, in a zip we write ourselves
        torch_zip(path, hostile_pickle(kind, marker), {"0": bytes(8)})
    elif wrapping == "torch.save":  # torch itself writes the payload into a valid checkpoint
        torch.save({"weight": torch.ones(3), "evil": PAYLOADS[kind][0](marker)}, path,
                   pickle_protocol=PAYLOADS[kind][2])
    else:
        path.write_bytes(hostile_pickle(kind, marker))
    with pytest.raises(CheckpointError) as caught:
        read_torch_bin(path)
    message = str(caught.value)
    assert str(path) in message and culprit in message and "not loaded" in message, message
    assert not marker.exists()
    # The payload is live: plain pickle runs it. Without this, the check above proves nothing.
    pickle.loads(hostile_pickle(kind, marker))
    assert marker.exists()


# GLOBAL 'some.module Thing', called with no arguments.
UNKNOWN_GLOBAL = b"\x80\x02}X\x01\x00\x00\x00xcsome.module\nThing\n)Rs."


@pytest.mark.parametrize("wrapping", ["torch zip", "bare pickle"])
def test_unknown_global(tmp_path, wrapping):
    path = tmp_path / "w.bin"
    if wrapping == "torch zip":
        torch_zip(path, UNKNOWN_GLOBAL)
    else:
        path.write_bytes(UNKNOWN_GLOBAL)
    with pytest.raises(CheckpointError, match="some.module.Thing") as caught:
        read_torch_bin(path)
    assert str(path) in str(caught.value)


def test_pickle_cannot_rewrite_a_storage(tmp_path):
    """BUILD on a storage could swap in an array the bounds check does not cover."""
    pickled, storages = torch_entries({"w": torch.ones(4)})
    # After the persistent id is resolved, set an attribute on the storage: BUILD {"data": 1}.
    marker = b"Q"  # BINPERSID, once in this pickle
    assert pickled.count(marker) == 1
    pickled = pickled.replace(marker, marker + b"}X\x04\x00\x00\x00dataK\x01sb")
    with pytest.raises(CheckpointError, match="modify a Storage"):
        read_torch_bin(torch_zip(tmp_path / "w.bin", pickled, storages))


def test_tensor_outside_its_storage(tmp_path):
    """A size or offset past the storage's end would read foreign memory: refused."""
    pickled, storages = torch_entries({"w": torch.ones(4)})
    storages["0"] = storages["0"][:8]  # 2 floats left where the pickle says 4
    with pytest.raises(CheckpointError, match=r"w.bin.*data/0 holds 8 bytes.*need 16"):
        read_torch_bin(torch_zip(tmp_path / "w.bin", pickled, storages))
    pickled, storages = torch_entries({"w": torch.ones(4)})
    # size (4,) -> (9,): BININT1 4, TUPLE1 is the size, the first K\x04\x85 in this pickle.
    assert b"K\x04\x85" in pickled
    pickled = pickled.replace(b"K\x04\x85", b"K\x09\x85", 1)
    with pytest.raises(CheckpointError, match=r"reaches element 8 of storage '0'.*only 4"):
        read_torch_bin(torch_zip(tmp_path / "w2.bin", pickled, storages))


def test_missing_storage_entry(tmp_path):
    pickled, _ = torch_entries({"w": torch.ones(4)})
    with pytest.raises(CheckpointError, match="archive/data/0 is missing"):
        read_torch_bin(torch_zip(tmp_path / "w.bin", pickled))


def test_legacy_format(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy serialization format") as caught:
        read_torch_bin(path)
    assert str(path) in str(caught.value) and "safetensors" in str(caught.value)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated") as caught:
        read_torch_bin(path)
    assert str(path) in str(caught.value)


def test_compressed_entry(tmp_path):
    pickled, storages = torch_entries({"w": torch.ones(100)})
    path = torch_zip(tmp_path / "w.bin", pickled, storages, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"w.bin: zip entry archive/data.pkl is compressed"):
        read_torch_bin(path)


def test_big_endian(tmp_path):
    pickled, storages = torch_entries({"w": torch.ones(2)})
    path = torch_zip(tmp_path / "w.bin", pickled, storages, byteorder=b"big")
    with pytest.raises(CheckpointError, match=r"w.bin was saved on a big-endian machine"):
        read_torch_bin(path)


def test_not_a_state_dict(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.bin")
    with pytest.raises(CheckpointError, match=r"ckpt.bin is not a plain state dict: entry "
                                              r"'model' is a dict"):
        read_torch_bin(tmp_path / "ckpt.bin")
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match=r"list.bin holds a pickled list"):
        read_torch_bin(tmp_path / "list.bin")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "Git LFS pointer"),
    (b"<html>not found</html>", "neither a zip"),
    (b"\x80\x02garbage", "not a valid torch state dict pickle"),
    (pickle.dumps({"w": [1.0, 2.0]}, protocol=2), "bare pickle"),
    (b"PK\x03\x04" + bytes(40), "truncated"),
])
def test_not_a_torch_file(tmp_path, content, message):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_torch_bin(path)
    assert str(path) in str(caught.value)
