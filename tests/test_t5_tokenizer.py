"""miniblip2.checkpoint.tokenizer's T5 path against transformers' T5Tokenizer (AutoTokenizer) on the real
blip2-flan-t5-xl files, and the tiny T5 test tokenizer in both libraries.

Token ids are integers: every comparison here is exact equality, no tolerance.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer, Blip2Processor, T5Tokenizer

from miniblip2.checkpoint.tokenizer import load_tokenizer, with_image_token
from miniblip2.errors import CheckpointError
from miniblip2.testing.tiny_tokenizer import (
    CORPUS,
    T5_CHARACTERS,
    build_tiny_processor_files,
    build_tiny_t5_tokenizer,
    build_tiny_tokenizer,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "blip2-flan-t5-xl"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"{REFERENCE} is absent")

PROMPTS = {
    "empty": "",
    "question": "Question: what is this? Answer:",
    "leading-space": " Hello world",
    "trailing-space": "Hello world ",  # the file's own pipeline would add a "▁" before </s>
    "unicode": "naïve café, Straße, 日本語のテキスト, русский, العربية, עברית",
    "combining-and-zwj": "e\u0301 👩\u200d👩\u200d👧 🇫🇷 👍🏽",
    "emoji": "😀😃😄 🐶🐱 🚀✨",
    "whitespace-runs": "a    b      c \u00a0\u2028\u3000 d   ",
    "newlines-tabs": "line one\nline two\n\n\tindented\r\n\t\tmore\n",
    "control": "nul\x00 bell\x07 esc\x1b del\x7f",
    "digits": "In 2023, 14 rooms; 1,250,000 visitors and 3.14159 pi 007",
    "punctuation": "Hello, world! (a) [b] {c} \"d\" 'e' - f... g?! h; i: j/k\\l @#$%^&*_+=~`|<>",
    "contractions": "it's don't I'm you're  ,a . b ! c ?",
    "fullwidth": "ＡＢＣ１２３ ﬁ ① ㍿",  # the Precompiled (NFKC) normalizer folds these
    "image-literal": "a <image> b<image>c <image>",
    "eos-literal": "Answer: </s>",
    "special-literals": "</s>x<pad>y<s>z<unk><mask> <extra_id_0> <extra_id_99>x",
    "long": ("The quick brown fox jumps over the lazy dog. " * 150) + "x" * 3000 + " 1234567890" * 50,
    "random-codepoints": "".join(map(chr, np.random.default_rng(0).integers(0x20, 0xD7FF, 400))),
}


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(REFERENCE)


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(REFERENCE)


def pipeline(backend: Backend) -> dict:
    return json.loads(backend.to_str())


@needs_reference
@pytest.mark.parametrize("name", PROMPTS)
def test_encode_and_decode_match_transformers(hf, ours, name):
    expected = hf(PROMPTS[name])["input_ids"]
    assert expected[-1] == 1  # EOS appended, no BOS
    assert ours.encode(PROMPTS[name]) == expected
    for skip in (True, False):
        assert ours.decode(expected, skip_special_tokens=skip) == hf.decode(expected, skip_special_tokens=skip)


@needs_reference
def test_the_whole_pipeline_matches_transformers(hf, ours):
    # Stronger than equal ids on some prompts: model, normalizer, pre-tokenizer, post-processor,
    # decoder and added tokens (with their flags) serialize to the same JSON.
    assert pipeline(ours.backend) == pipeline(hf.backend_tokenizer)


@needs_reference
def test_known_ids(ours):
    assert ours.encode("Question: what is this? Answer:") == [11860, 10, 125, 19, 48, 58, 11801, 10, 1]
    assert ours.encode("a dog") == [3, 9, 1782, 1]  # "▁", "a", "▁dog": the Unigram's best split
    assert ours.encode("{") == [3, 2, 1]  # no "{" piece: <unk> (2)
    assert ours.encode("\n") == [1]  # whitespace alone is nothing
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.image_token_id) == (None, 1, 0, 32100)
    assert ours.vocab_size == 32101 and ours.clean_up_spaces is False


@needs_reference
def test_attributes_match_transformers(hf, ours):
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                        hf.pad_token_id)
    assert ours.image_token_id == hf.convert_tokens_to_ids("<image>")
    assert ours.clean_up_spaces == hf.clean_up_tokenization_spaces


@needs_reference
def test_the_files_own_pipeline_is_not_transformers(ours):
    # Why t5_unigram rebuilds the pipeline: tokenizer.json as written keeps a trailing "▁" (3).
    raw = Backend.from_file(str(REFERENCE / "tokenizer.json"))
    assert raw.encode("Hello world ").ids == [8774, 296, 3, 1]
    assert ours.encode("Hello world ") == [8774, 296, 1]


@needs_reference
def test_batch_decode_matches_transformers(hf, ours):
    # Generated-style rows: image ids, words, EOS, padding, and one id past the tokenizer (the
    # model has 32128 rows), which both drop.
    ids = np.array([[32100, 32100, 11860, 10, 3, 9, 1782, 1, 0, 0],
                    [32100, 32100, 8774, 296, 55, 1, 32099, 32000, 32110, 0]], dtype=np.int64)
    for skip in (True, False):
        expected = hf.batch_decode(ids.tolist(), skip_special_tokens=skip)
        assert ours.batch_decode(ids, skip_special_tokens=skip) == expected
        assert ours.batch_decode(ids.tolist(), skip_special_tokens=skip) == expected
    # <image> is a plain added token for AutoTokenizer (added_tokens.json's legacy reading)...
    assert ours.batch_decode(ids)[0] == "<image><image> Question: a dog"


@needs_reference
def test_blip2_processor_makes_image_special():
    # ...and Blip2Processor.__init__ re-adds it as special, so its tokenizer skips it.
    hf = Blip2Processor.from_pretrained(REFERENCE).tokenizer
    ours = with_image_token(load_tokenizer(REFERENCE))
    assert pipeline(ours.backend) == pipeline(hf.backend_tokenizer)
    ids = [32100, 32100, 11860, 10, 1]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "Question:"
    assert ours.encode("a <image>") == hf("a <image>")["input_ids"] == [3, 9, 32100, 1]
    assert with_image_token(ours) is ours


# ---------------------------------------------------------------------------------------------
# The tiny T5 tokenizer (miniblip2/testing/tiny_tokenizer.py): runs without ../shared.

@pytest.fixture(scope="module", params=[160, 300])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-t5-{request.param}")
    assert build_tiny_t5_tokenizer(folder, request.param) == request.param
    return folder, request.param


def test_tiny_t5_tokenizer_loads_identically_in_both_libraries(tiny):
    folder, vocab_size = tiny
    hf = AutoTokenizer.from_pretrained(folder)
    assert isinstance(hf, T5Tokenizer)  # the same kind of tokenizer as the real one
    ours = load_tokenizer(folder)
    assert pipeline(ours.backend) == pipeline(hf.backend_tokenizer)
    assert ours.vocab_size == len(hf) == vocab_size
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, 1, 0) == (None, 1, 0)
    assert ours.image_token_id == hf.convert_tokens_to_ids("<image>") == vocab_size - 1
    for text in list(PROMPTS.values()) + CORPUS.splitlines()[:5]:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_tiny_t5_processor_tokenizer_matches_blip2_processor(tiny, tmp_path):
    folder, vocab_size = tiny
    shutil.copytree(folder, tmp_path / "f")
    build_tiny_processor_files(tmp_path / "f", image_size=30, num_query_tokens=4)
    hf = Blip2Processor.from_pretrained(tmp_path / "f").tokenizer
    ours = with_image_token(load_tokenizer(folder))
    assert pipeline(ours.backend) == pipeline(hf.backend_tokenizer)
    ids = [vocab_size - 1, vocab_size - 1] + ours.encode("a dog")
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "a dog"


def test_tiny_t5_tokenizer_layout(tiny):
    folder, vocab_size = tiny
    tokenizer = load_tokenizer(folder)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert [vocab[t] for t in ("<pad>", "</s>", "<unk>", "▁")] == [0, 1, 2, 3]
    assert [vocab[t] for t in ("<extra_id_2>", "<extra_id_1>", "<extra_id_0>", "<image>")] == list(
        range(vocab_size - 4, vocab_size))  # sentinels in T5's reverse order, then <image> last
    assert sorted(vocab.values()) == list(range(vocab_size))
    assert tokenizer.encode("the dog") == [vocab["▁the"], vocab["▁dog"], 1]  # known words: one token each
    assert tokenizer.encode("Question: a") == [vocab["▁Question"], vocab[":"], vocab["▁a"], 1]
    assert 2 not in tokenizer.encode(T5_CHARACTERS + " 0 9 , . ? !")  # no <unk> on printable ASCII
    assert tokenizer.encode("é") == [3, 2, 1]  # outside ASCII: <unk>


def test_tiny_t5_tokenizer_is_deterministic(tmp_path):
    build_tiny_t5_tokenizer(tmp_path / "a", 200)
    build_tiny_t5_tokenizer(tmp_path / "b", 200)
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tiny_t5_tokenizer_sizes(tmp_path):
    assert build_tiny_t5_tokenizer(tmp_path / "none", 99, extra_ids=0) == 99  # characters only
    assert AutoTokenizer.from_pretrained(tmp_path / "none").convert_tokens_to_ids("<image>") == 98
    with pytest.raises(ValueError, match=r"vocab_size must be 102\.\.\d+ .*got 101"):
        build_tiny_t5_tokenizer(tmp_path / "small", 101)
    with pytest.raises(ValueError, match="got 100000"):
        build_tiny_t5_tokenizer(tmp_path / "large", 100_000)


def test_clean_up_tokenization_spaces_as_transformers(tiny, tmp_path):
    # Off in every BLIP-2 file; a config that turns it on gets transformers' clean-up, which
    # does change this decode (so the comparison can fail).
    folder, _ = tiny
    shutil.copytree(folder, tmp_path / "f")
    config = json.loads((tmp_path / "f" / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    (tmp_path / "f" / "tokenizer_config.json").write_text(json.dumps(config))
    hf, ours = AutoTokenizer.from_pretrained(tmp_path / "f"), load_tokenizer(tmp_path / "f")
    assert ours.clean_up_spaces is True
    ids = ours.encode("it 's a dog . is it ? yes , it is ! they 're here")
    expected = "it's a dog. is it? yes, it is! they're here"
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == expected
    assert load_tokenizer(folder).decode(ids) != ours.decode(ids)


def test_t5_files_that_do_not_fit(tiny, tmp_path):
    folder, _ = tiny
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(folder / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="no tokenizer.json.*spiece.model"):
        load_tokenizer(tmp_path)
    build_tiny_tokenizer(tmp_path / "opt", 300)  # a BPE where T5Tokenizer expects a Unigram
    shutil.copy(tmp_path / "opt" / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="BPE model.*T5Tokenizer"):
        load_tokenizer(tmp_path)
