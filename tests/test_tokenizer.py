"""miniblip2.checkpoint.tokenizer against transformers' GPT2Tokenizer (AutoTokenizer) on the real OPT files,
its two loading paths against each other, and the tiny test tokenizer in both libraries.

Token ids are integers: every comparison here is exact equality, no tolerance.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, GPT2Tokenizer

from miniblip2.checkpoint.tokenizer import load_tokenizer, with_image_token
from miniblip2.errors import CheckpointError, PromptError
from miniblip2.testing.tiny_tokenizer import CORPUS, build_tiny_tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "blip2-opt-2.7b"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference is not beside the repo")
CLASSIC_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")

PROMPTS = {
    "empty": "",
    "question": "Question: which city is this? Answer:",
    "leading-space": " Hello world",
    "unicode": "naïve café, Straße, 日本語のテキスト, русский, العربية, עברית",
    "combining-and-zwj": "e\u0301 👩\u200d👩\u200d👧 🇫🇷 👍🏽",
    "emoji": "😀😃😄 🐶🐱 🚀✨",
    "whitespace-runs": "a    b      c \u00a0\u2028\u3000 d   ",
    "newlines-tabs": "line one\nline two\n\n\tindented\r\n\t\tmore\n",
    "control": "nul\x00 bell\x07 esc\x1b del\x7f",
    "image-literal": "a <image> b<image>c <image>",
    "special-literals": "</s>x<pad>y<s>z<unk><mask>",
    "long": ("The quick brown fox jumps over the lazy dog. " * 150) + "x" * 3000 + " 1234567890" * 50,
    "random-codepoints": "".join(map(chr, np.random.default_rng(0).integers(0x20, 0xD7FF, 400))),
}


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(REFERENCE)


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(REFERENCE)


@pytest.fixture(scope="module")
def ours_from_vocab_and_merges(tmp_path_factory):
    """The same files minus tokenizer.json: the vocab.json + merges.txt path."""
    folder = tmp_path_factory.mktemp("opt-classic")
    for name in CLASSIC_FILES:
        shutil.copy(REFERENCE / name, folder / name)
    return load_tokenizer(folder)


@needs_reference
@pytest.mark.parametrize("name", PROMPTS)
def test_encode_matches_transformers(hf, ours, ours_from_vocab_and_merges, name):
    expected = hf(PROMPTS[name])["input_ids"]
    assert expected[0] == 2  # the processor's BOS
    assert ours.encode(PROMPTS[name]) == expected
    assert ours_from_vocab_and_merges.encode(PROMPTS[name]) == expected


@needs_reference
@pytest.mark.parametrize("name", PROMPTS)
def test_decode_matches_transformers_and_round_trips(hf, ours, name):
    ids = hf(PROMPTS[name])["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if name not in ("image-literal", "special-literals"):  # skipping specials drops those literals
        assert ours.decode(ids) == PROMPTS[name]


@needs_reference
def test_known_ids(ours):
    # CHECKPOINTS.md 1.3 / 1.6: fairseq-ordered ids, "\n" = 50118, <image> = 50265.
    assert ours.encode("Question: which city is this? Answer:") == [2, 45641, 35, 61, 343, 16, 42, 116, 31652, 35]
    assert ours.encode("\n") == [2, 50118]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.image_token_id) == (2, 2, 1, 50265)
    assert ours.vocab_size == 50266


@needs_reference
def test_attributes_match_transformers(hf, ours, ours_from_vocab_and_merges):
    for tokenizer in (ours, ours_from_vocab_and_merges):
        assert tokenizer.vocab_size == len(hf)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
        assert tokenizer.image_token_id == hf.convert_tokens_to_ids("<image>")


@needs_reference
def test_both_paths_build_the_same_pipeline(ours, ours_from_vocab_and_merges):
    # Stronger than equal ids on some prompts: the serialized pipelines (vocab, merges, added
    # tokens with their flags, pre-tokenizer, post-processor, decoder) are equal.
    assert json.loads(ours.backend.to_str()) == json.loads(ours_from_vocab_and_merges.backend.to_str())


@needs_reference
def test_batch_decode_matches_transformers(hf, ours):
    # Generated-style rows: image ids, BOS, words, "\n" EOS, padding, and one id past the
    # tokenizer (the model has 50304 rows); transformers drops that one silently, as we do.
    ids = np.array([[50265, 50265, 2, 102, 693, 2828, 50118, 1],
                    [50265, 50265, 2, 24, 18, 45, 10, 50270]], dtype=np.int64)
    expected = hf.batch_decode(ids.tolist(), skip_special_tokens=True)
    assert expected == ["a woman sitting\n", " it's not a"]
    assert ours.batch_decode(ids) == expected
    assert ours.batch_decode(ids.tolist()) == expected
    assert ours.batch_decode(ids, skip_special_tokens=False) == hf.batch_decode(ids.tolist())


@needs_reference
def test_added_tokens_json_supplies_a_missing_image_token(tmp_path):
    # An older tokenizer.json without <image>: added_tokens.json puts it back at id 50265.
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(REFERENCE / name, tmp_path / name)
    data = json.loads((REFERENCE / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]["50265"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.image_token_id == 50265 and tokenizer.vocab_size == 50266
    assert tokenizer.encode("a <image>") == [2, 102, 1437, 50265]
    assert tokenizer.decode([2, 50265, 102]) == "a"  # special: skipped when decoding


# ---------------------------------------------------------------------------------------------
# The tiny tokenizer (tests/tiny_tokenizer.py): runs without ../shared.

@pytest.fixture(scope="module", params=[300, 1000])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_tokenizer(folder, request.param)
    return folder, request.param


def test_tiny_tokenizer_loads_identically_in_both_libraries(tiny, tmp_path):
    folder, vocab_size = tiny
    hf = AutoTokenizer.from_pretrained(folder)
    assert isinstance(hf, GPT2Tokenizer)  # the same kind of tokenizer as the real one
    for name in CLASSIC_FILES:
        shutil.copy(folder / name, tmp_path / name)
    for ours in (load_tokenizer(folder), load_tokenizer(tmp_path)):  # tokenizer.json, vocab + merges
        assert ours.vocab_size == len(hf) == vocab_size
        assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 2, 1)
        assert ours.image_token_id == hf.convert_tokens_to_ids("<image>") == vocab_size - 1
        for text in list(PROMPTS.values()) + CORPUS.splitlines()[:5]:
            ids = hf(text)["input_ids"]
            assert ours.encode(text) == ids
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_tiny_tokenizer_layout(tiny):
    folder, vocab_size = tiny
    vocab = json.loads((folder / "vocab.json").read_text())
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert len(vocab) == vocab_size - 1 and sorted(vocab.values()) == list(range(vocab_size - 1))
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer.encode("\n")) == 2  # BOS + one token for the newline
    assert len(tokenizer.encode(" the")) == 2  # a trained merge: " the" is one token
    assert tokenizer.encode("<image>")[1:] == [vocab_size - 1]


def test_tiny_tokenizer_is_deterministic(tmp_path):
    build_tiny_tokenizer(tmp_path / "a", 400)
    build_tiny_tokenizer(tmp_path / "b", 400)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tiny_tokenizer_sizes_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="at least 262"):
        build_tiny_tokenizer(tmp_path, 100)
    with pytest.raises(ValueError, match="at most"):
        build_tiny_tokenizer(tmp_path, 100_000)


def test_image_token_added_when_absent(tiny, tmp_path):
    # No <image> anywhere: image_token_id is None, and with_image_token adds it at the next id,
    # as Blip2Processor.__init__ does.
    folder, vocab_size = tiny
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    for name in ("special_tokens_map.json",):
        shutil.copy(folder / name, tmp_path / name)
    bare = load_tokenizer(tmp_path)
    assert bare.image_token_id is None and bare.vocab_size == vocab_size - 1
    added = with_image_token(bare)
    assert added.image_token_id == vocab_size - 1 and bare.image_token_id is None
    assert with_image_token(added) is added


# ---------------------------------------------------------------------------------------------
# Bad files and bad input.

def test_missing_and_broken_files(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json and no vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_tokenizer(tmp_path)
    folder, vocab_size = tiny
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="no usable bos_token"):
        load_tokenizer(tmp_path)  # no tokenizer_config.json nor special_tokens_map.json
    shutil.copy(folder / "special_tokens_map.json", tmp_path / "special_tokens_map.json")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": vocab_size + 5}))
    with pytest.raises(CheckpointError, match="do not match"):
        load_tokenizer(tmp_path)


def test_bad_prompts_and_ids(tiny):
    tokenizer = load_tokenizer(tiny[0])
    with pytest.raises(PromptError, match="must be a str"):
        tokenizer.encode(["a list"])
    with pytest.raises(PromptError, match="lone surrogate"):
        tokenizer.encode("broken \ud800 text")
    with pytest.raises(PromptError, match="non-negative"):
        tokenizer.decode([2, -1])
    with pytest.raises(PromptError, match="batch_decode"):
        tokenizer.decode([[2, 3]])
    with pytest.raises(PromptError, match=r"\[batch, tokens\]"):
        tokenizer.batch_decode(np.array([2, 3]))
    with pytest.raises(PromptError, match=r"\[batch, tokens\]"):
        tokenizer.batch_decode(7)
