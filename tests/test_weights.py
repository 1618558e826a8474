"""miniblip2.checkpoint.safetensors against the safetensors library, transformers, and broken files.

Every comparison of tensors here is exact (tolerance 0, bit for bit): reading and writing
safetensors only moves bytes, and BF16 -> F32 widening is exact, so any difference is a bug.
"""

import io
import json
import mmap
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from miniblip2.checkpoint import safetensors as W
from miniblip2.checkpoint.safetensors import (
    BF16,
    bf16_to_float32,
    check_weights,
    float32_to_bf16,
    load_checkpoint,
    nest,
    read_safetensors,
    save_safetensors,
)
from miniblip2.errors import CheckpointError

REFERENCE = Path(__file__).parents[2] / "shared" / "reference" / "blip2-opt-2.7b"
TIED = {"language_model.lm_head.weight": "language_model.model.decoder.embed_tokens.weight"}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes: NaN == NaN and -0.0 != 0.0, unlike `==`."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def owner(array: np.ndarray):
    """The object at the end of an array's .base chain (the mmap for a zero-copy view)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    # np.frombuffer keeps the buffer through a memoryview; .obj is what it views.
    return array.obj if isinstance(array, memoryview) else array


def numpy_tensors(rng) -> dict[str, np.ndarray]:
    """One tensor of every dtype we support, plus a scalar and an empty tensor."""
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4, 2, 3)).astype(np.float16),
        "f64": rng.standard_normal(7),
        "i64": rng.integers(-2**40, 2**40, (2, 3)),
        "i32": rng.integers(-2**30, 2**30, 5).astype(np.int32),
        "i16": rng.integers(-2**14, 2**14, 5).astype(np.int16),
        "i8": rng.integers(-100, 100, 3).astype(np.int8),
        "u16": rng.integers(0, 2**16, 3).astype(np.uint16),
        "u8": rng.integers(0, 255, 9).astype(np.uint8),
        "bool": rng.random(6) > 0.5,
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def torch_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"),
                            1e-40, 3e38, 1.00390625])  # a subnormal, near-max, a BF16 tie
    return {
        "bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "bf16_special": special.to(torch.bfloat16),
        "f16": torch.randn(2, 9, generator=g).half(),
        "f32": torch.randn(4, 4, generator=g),
        "i64": torch.arange(12).reshape(3, 4),
    }


# ---------------------------------------------------------------------------------------------
# Reading files written by the safetensors library.

def test_reads_numpy_save_file_bit_exact(tmp_path):
    tensors = numpy_tensors(np.random.default_rng(0))
    safetensors.numpy.save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "np"})
    read = read_safetensors(tmp_path / "a.safetensors")
    assert read.keys() == tensors.keys()  # __metadata__ is not a tensor
    for name, array in tensors.items():
        assert same_bits(read[name], array), name


def test_reads_torch_save_file_bit_exact_including_bf16(tmp_path):
    tensors = torch_tensors()
    safetensors.torch.save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    read = read_safetensors(tmp_path / "t.safetensors")
    for name in ("bf16", "bf16_special"):
        assert read[name].dtype == np.uint16 and W.is_bf16(read[name])
        # BF16 -> F32 is exact, so tolerance 0 against torch's own widening, NaN included.
        assert same_bits(bf16_to_float32(read[name]), tensors[name].float().numpy()), name
    for name in ("f16", "f32", "i64"):
        assert same_bits(read[name], tensors[name].numpy()), name


def test_float32_to_bf16_rounds_like_torch():
    rng = np.random.default_rng(1)
    any_bits = rng.integers(0, 2**32, 10_000, np.uint64).astype(np.uint32)  # every exponent
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 1e3,
                        any_bits.view(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.00390625, 3.4028235e38],
                                 np.float32)])
    ours = float32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert W.is_bf16(ours)
    nan = np.isnan(x)  # torch may keep a NaN's sign and payload; we write the canonical NaN
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_to_float32(ours[nan])).all()


def test_float32_is_memory_mapped_not_copied(tmp_path):
    tensors = torch_tensors()
    del tensors["bf16_special"]  # 3e38 does not fit float16; see the overflow test
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    for flat in (read_safetensors(tmp_path / "model.safetensors"), load_checkpoint(tmp_path)):
        f32 = flat["f32"]
        assert not f32.flags.owndata and not f32.flags.writeable
        assert isinstance(owner(f32), mmap.mmap)
    # Asking for float16 converts F32 and BF16 (copies) but leaves F16 on disk mapped.
    half = load_checkpoint(tmp_path, dtype=np.float16)
    assert half["f32"].dtype == np.float16 and half["f32"].flags.owndata
    assert same_bits(half["f32"], tensors["f32"].half().numpy())
    assert same_bits(half["bf16"], tensors["bf16"].float().half().numpy())
    assert isinstance(owner(half["f16"]), mmap.mmap)
    assert same_bits(half["i64"], tensors["i64"].numpy())  # integers keep their dtype


def test_load_checkpoint_converts_bf16_and_f16_to_float32(tmp_path):
    tensors = torch_tensors()
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    flat = load_checkpoint(tmp_path)
    for name in ("bf16", "bf16_special", "f16", "f32"):
        assert same_bits(flat[name], tensors[name].float().numpy()), name
    kept = load_checkpoint(tmp_path, dtype=None)
    assert W.is_bf16(kept["bf16"]) and kept["f16"].dtype == np.float16
    with pytest.raises(CheckpointError, match="np.float32 or np.float16"):
        load_checkpoint(tmp_path, dtype=np.int8)


def test_float16_overflow_names_the_shard_and_tensor(tmp_path):
    # inf and NaN stay what they are; a finite 1e5 has no float16 and must not become inf.
    ok = np.array([np.inf, np.nan, 6e4], np.float32)
    write_shards(tmp_path, {"ok": ok, "big": np.array([1.0, -1e5], np.float32)}, per_shard=1)
    with pytest.raises(CheckpointError,
                       match=r"model-00002-of-00002.*'big'.*float16.*1e\+05.*dtype=np.float32"):
        load_checkpoint(tmp_path, dtype=np.float16)
    save_safetensors(tmp_path / W.SINGLE_FILE, {"ok": ok})  # found first, as in transformers
    assert same_bits(load_checkpoint(tmp_path, dtype="float16")["ok"], ok.astype(np.float16))


# ---------------------------------------------------------------------------------------------
# Writing files the safetensors library reads.

def test_save_safetensors_is_read_by_the_library(tmp_path):
    tensors = numpy_tensors(np.random.default_rng(2))
    tensors["big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    tensors["strided"] = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    path = tmp_path / "ours.safetensors"
    save_safetensors(path, tensors, metadata={"format": "np", "note": "random"})
    theirs = safetensors.numpy.load_file(path)
    for name, array in tensors.items():
        assert same_bits(theirs[name], np.asarray(array, dtype=array.dtype.newbyteorder("=")))
        assert np.array_equal(read_safetensors(path)[name], array), name
    with safetensors.safe_open(path, "np") as f:
        assert f.metadata() == {"format": "np", "note": "random"}
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert length % 8 == 0  # padded like the reference writer, so tensors start aligned


def test_save_safetensors_writes_bf16_that_torch_reads(tmp_path):
    x = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)
    save_safetensors(tmp_path / "b.safetensors", {"w": float32_to_bf16(x),
                                                  "raw": np.array([0x3F80], np.uint16).view(BF16)})
    theirs = safetensors.torch.load_file(tmp_path / "b.safetensors")
    assert theirs["w"].dtype == torch.bfloat16
    assert torch.equal(theirs["w"], torch.from_numpy(x).to(torch.bfloat16))
    assert theirs["raw"].item() == 1.0  # 0x3F80 is 1.0 in BF16


def test_save_safetensors_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(CheckpointError, match=r"'c'.*complex64"):
        save_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})


# ---------------------------------------------------------------------------------------------
# Broken files: one clear CheckpointError each, never a NumPy/json traceback.

def header_file(header, data: bytes = b"", length=None) -> bytes:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


F32_ENTRY = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
BAD_FILES = {
    "too short": (b"\x01\x02\x03", ["shorter than the 8-byte"]),
    "truncated header": (header_file(F32_ENTRY, length=10_000), ["truncated header", "10000"]),
    "not json": (header_file(b"{not json", b""), ["not valid JSON"]),
    "not utf8": (header_file(b"\xff\xfe\x00", b""), ["not valid JSON"]),
    "not a dict": (header_file([1, 2]), ["not an object", "list"]),
    "unsupported dtype": (header_file({"w": {"dtype": "F8_E4M3", "shape": [4],
                                             "data_offsets": [0, 4]}}, bytes(4)),
                          ["'w'", "F8_E4M3", "Supported dtypes", "BF16"]),
    "bad shape": (header_file({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                              bytes(4)), ["'w'", "invalid shape"]),
    "bad offsets": (header_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
                                bytes(4)), ["'w'", "data_offsets"]),
    "offsets vs shape": (header_file({"w": {"dtype": "F32", "shape": [2, 2],
                                            "data_offsets": [0, 12]}}, bytes(12)),
                         ["'w'", "(2, 2)", "16 bytes", "span 12"]),
    "truncated data": (header_file(F32_ENTRY, bytes(12)), ["truncated", "16 bytes", "only 12"]),
    "overlap": (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                            bytes(12)), ["overlap", "'a'", "'b'"]),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_raises_clear_error(tmp_path, case):
    content, words = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        read_safetensors(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)


def test_bad_json_error_keeps_its_cause(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(header_file(b"{oops"))
    with pytest.raises(CheckpointError) as caught:
        read_safetensors(tmp_path / "bad.safetensors")
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_truncated_real_file_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-100])  # an interrupted download
    with pytest.raises(CheckpointError, match="is truncated.*download the file again"):
        load_checkpoint(tmp_path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        read_safetensors(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# Folders: single file, shards and index, refusals.

def write_shards(folder: Path, tensors: dict, per_shard: int) -> None:
    """Split `tensors` into shards the way save_pretrained does, with its index."""
    names = list(tensors)
    chunks = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        shard = f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_safetensors(folder / shard, {n: tensors[n] for n in chunk})
        weight_map.update(dict.fromkeys(chunk, shard))
    (folder / W.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_and_single_load_identically(tmp_path):
    tensors = numpy_tensors(np.random.default_rng(4))
    (tmp_path / "single").mkdir()
    (tmp_path / "sharded").mkdir()
    save_safetensors(tmp_path / "single" / W.SINGLE_FILE, tensors)
    write_shards(tmp_path / "sharded", tensors, per_shard=5)
    single, sharded = load_checkpoint(tmp_path / "single"), load_checkpoint(tmp_path / "sharded")
    assert single.keys() == sharded.keys() == tensors.keys()
    for name in tensors:
        assert same_bits(single[name], sharded[name]), name


@pytest.fixture
def sharded(tmp_path):
    write_shards(tmp_path, {f"layer.{i}.weight": np.full((2,), i, np.float32) for i in range(6)},
                 per_shard=2)
    return tmp_path


def test_missing_shard_names_the_shard_and_index(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(sharded)
    assert "model-00002-of-00003.safetensors" in str(caught.value)
    assert W.INDEX_FILE in str(caught.value)


def test_index_naming_a_key_the_shard_lacks(sharded):
    index = json.loads((sharded / W.INDEX_FILE).read_text())
    index["weight_map"]["layer.9.weight"] = "model-00001-of-00003.safetensors"
    (sharded / W.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003.*'layer\.9\.weight'"):
        load_checkpoint(sharded)


def test_shard_holding_a_key_the_index_lacks(sharded):
    index = json.loads((sharded / W.INDEX_FILE).read_text())
    del index["weight_map"]["layer.0.weight"]
    (sharded / W.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"does not list.*'layer\.0\.weight'"):
        load_checkpoint(sharded)


def test_index_that_is_not_json(sharded):
    (sharded / W.INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="not a valid index"):
        load_checkpoint(sharded)


def test_only_pytorch_model_bin_is_refused_without_opening_it(tmp_path):
    # Not a valid pickle either: the error must come before anything reads the file.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    message = str(caught.value)
    for word in ("pytorch_model.bin", "pickle", "arbitrary code", "save_pretrained",
                 "safe_serialization=True", "Blip2ForConditionalGeneration.from_pretrained"):
        assert word in message, word
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "pytorch_model.bin")


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(CheckpointError, match="it is empty"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*config\.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_progress_bar_only_on_a_tty(tmp_path, monkeypatch):
    save_safetensors(tmp_path / W.SINGLE_FILE, {"w": np.ones(1000, np.float32)})
    monkeypatch.setattr(W, "PROGRESS_MIN_BYTES", 1)  # make a 4 kB load count as big

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for progress, stream, shown in ((True, Tty(), True), (False, Tty(), False),
                                    (True, io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        load_checkpoint(tmp_path, progress=progress)
        text = stream.getvalue()
        assert (("loading weights 100%" in text and "\r" in text) if shown else text == "")


# ---------------------------------------------------------------------------------------------
# check_weights: coverage, shapes, ties.

def small_flat():
    return {"a.weight": np.zeros((3, 2)), "a.bias": np.zeros(3), "embed.weight": np.ones((5, 2))}


def test_check_weights_accepts_a_match_and_fills_ties():
    flat = small_flat()
    expected = {"a.weight": (3, 2), "a.bias": (3,), "embed.weight": (5, 2), "head.weight": (5, 2)}
    out = check_weights(flat, expected, tied={"head.weight": "embed.weight"})
    assert out["head.weight"] is flat["embed.weight"]  # shared, not copied
    assert "head.weight" not in flat  # the caller's dict is left alone
    # A tied key the file does have is kept, not overwritten by its source.
    flat["head.weight"] = np.zeros((5, 2))
    out = check_weights(flat, expected, tied={"head.weight": "embed.weight"})
    assert out["head.weight"] is flat["head.weight"]


def test_check_weights_lists_all_missing_keys():
    expected = {f"layers.{i}.weight": (2,) for i in range(25)}
    with pytest.raises(CheckpointError) as caught:
        check_weights({"layers.0.weight": np.zeros(2)}, expected)
    message = str(caught.value)
    assert "missing: 24 of the 25 weights the model needs" in message
    assert "layers.1.weight" in message and "layers.10.weight" in message
    assert "layers.11.weight" not in message and "and 14 more" in message


def test_check_weights_names_wrong_shapes():
    with pytest.raises(CheckpointError) as caught:
        check_weights(small_flat(), {"a.weight": (2, 3), "a.bias": (3,), "embed.weight": (5, 2)})
    assert "a.weight: expected (2, 3), found (3, 2)" in str(caught.value)
    assert "a.bias" not in str(caught.value)


def test_check_weights_rejects_unused_keys_unless_ignored():
    expected = {"a.weight": (3, 2), "a.bias": (3,)}
    with pytest.raises(CheckpointError, match=r"unused: 1 weight\(s\) .*\n    embed\.weight"):
        check_weights(small_flat(), expected)
    out = check_weights(small_flat(), expected, ignored_prefixes=("embed.",))
    assert out.keys() == {"a.weight", "a.bias"}


def test_check_weights_reports_every_kind_of_problem_at_once():
    with pytest.raises(CheckpointError) as caught:
        check_weights(small_flat(), {"a.weight": (3, 3), "b.weight": (1,)})
    message = str(caught.value)
    assert "missing: 1 of the 2 weights the model needs\n    b.weight" in message
    assert "wrong shape: 1 weight(s)\n    a.weight: expected (3, 3), found (3, 2)" in message
    assert "unused: 2 weight(s)" in message and "a.bias" in message and "embed.weight" in message


# ---------------------------------------------------------------------------------------------
# nest: names -> dicts and lists, nothing copied.

def test_nest_layout_keeps_names_and_arrays():
    flat = {"qformer.encoder.layer.0.attention.query.weight": np.zeros((4, 4)),
            "qformer.encoder.layer.1.attention.query.weight": np.ones((4, 4)),
            "qformer.layernorm.bias": np.zeros(4),
            "query_tokens": np.zeros((1, 2, 4))}
    w = nest(flat)
    layers = w["qformer"]["encoder"]["layer"]
    assert isinstance(layers, list) and len(layers) == 2
    layer1 = flat["qformer.encoder.layer.1.attention.query.weight"]
    assert layers[1]["attention"]["query"]["weight"] is layer1
    assert w["qformer"]["layernorm"]["bias"] is flat["qformer.layernorm.bias"]
    assert w["query_tokens"] is flat["query_tokens"]


def test_nest_gap_names_the_missing_index():
    flat = {f"vision_model.encoder.layers.{i}.mlp.fc1.weight": i for i in (0, 1, 3)}
    with pytest.raises(CheckpointError, match=r"'vision_model\.encoder\.layers'.*missing: 2"):
        nest(flat)


def test_nest_rejects_names_that_cannot_nest():
    with pytest.raises(CheckpointError, match="mix numbered and named"):
        nest({"a.0.w": 1, "a.x.w": 2})
    with pytest.raises(CheckpointError, match="itself a tensor"):
        nest({"a.b": 1, "a.b.c": 2})
    with pytest.raises(CheckpointError, match="both a tensor and the prefix"):
        nest({"a.b.c": 1, "a.b": 2})


def test_nest_real_blip2_opt_index_names():
    index = REFERENCE / "model.safetensors.index.json"
    if not index.is_file():
        pytest.skip(f"{index} not present")
    names = json.loads(index.read_text())["weight_map"]
    assert len(names) == 1247
    w = nest(dict.fromkeys(names, None))  # just the names: no tensors are needed
    assert len(w["vision_model"]["encoder"]["layers"]) == 39
    qformer_layers = w["qformer"]["encoder"]["layer"]
    assert len(qformer_layers) == 12
    # cross_attention_frequency 2: layers 0, 2, ..., 10 attend to the image.
    assert [("crossattention" in layer) for layer in qformer_layers] == [i % 2 == 0
                                                                          for i in range(12)]
    assert len(w["language_model"]["model"]["decoder"]["layers"]) == 32
    assert "lm_head" not in w["language_model"]  # tied to embed_tokens, so not stored
    assert set(w) == {"vision_model", "qformer", "query_tokens", "language_projection",
                      "language_model"}


def test_real_index_without_shards_names_the_missing_shard():
    if not (REFERENCE / W.INDEX_FILE).is_file():
        pytest.skip(f"{REFERENCE} not present")
    if (REFERENCE / "model-00001-of-00002.safetensors").exists():
        pytest.skip("the real shards are present; loading 15 GB is not a unit test")
    with pytest.raises(CheckpointError, match=r"shard model-0000[12]-of-00002\.safetensors"):
        load_checkpoint(REFERENCE)


# ---------------------------------------------------------------------------------------------
# A real (tiny, random) BLIP-2 written and read by transformers.

@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=24),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, ffn_dim=24, vocab_size=40,
                         word_embed_proj_dim=16, max_position_embeddings=32),
        num_query_tokens=4, image_token_index=39)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("tiny_blip2")
    model.save_pretrained(folder / "single")
    model.save_pretrained(folder / "sharded", max_shard_size="20KB")
    return transformers, model, folder


def test_transformers_checkpoint_loads_checks_and_round_trips(tiny_blip2, tmp_path):
    transformers, model, folder = tiny_blip2
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    expected = {name: array.shape for name, array in state.items()}
    assert len(list((folder / "sharded").glob("model-*.safetensors"))) > 1
    for kind in ("single", "sharded"):
        flat = load_checkpoint(folder / kind, progress=False)
        assert "language_model.lm_head.weight" not in flat  # transformers drops the tied copy
        weights = check_weights(flat, expected, tied=TIED)
        for name, array in state.items():
            assert same_bits(weights[name], array), (kind, name)
        nested = nest(weights)
        assert len(nested["qformer"]["encoder"]["layer"]) == 3
        assert "crossattention" in nested["qformer"]["encoder"]["layer"][2]
    # What save_safetensors writes, transformers loads back to the same model, bit for bit.
    flat = load_checkpoint(folder / "single", progress=False)
    save_safetensors(tmp_path / W.SINGLE_FILE, flat, metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "single" / "config.json").read_text())
    again = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    for name, tensor in again.state_dict().items():
        assert same_bits(tensor.numpy(), state[name]), name


def test_a_pytorch_model_bin_folder_loads_through_the_allowlist_reader(checkpoint, tmp_path):
    """A folder with only pytorch_model.bin (as some BLIP checkpoints are on the hub) loads through
    checkpoint/torch_bin.py and gives the same model as its safetensors twin, bit for bit."""
    import shutil

    import torch
    from test_parity import image_batch, prompts
    from transformers import Blip2ForConditionalGeneration

    import miniblip2
    folder = checkpoint()
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = Blip2ForConditionalGeneration.from_pretrained(folder).state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert "language_model.lm_head.weight" in state  # the .bin keeps the tied head, as old uploads do
    ours, twin = miniblip2.load(tmp_path), miniblip2.load(folder)
    pixels = image_batch(ours.config, 2, seed=1)
    ids, mask = prompts(ours.config, [2, 5], seed=2)
    np.testing.assert_array_equal(ours.forward(pixels, ids, mask), twin.forward(pixels, ids, mask))
