"""miniblip2.checkpoint.processor against transformers' Blip2Processor(images=..., text=..., padding=True).

input_ids and attention_mask are integers: compared exactly, dtype included (int64).
pixel_values: 1e-6, as in test_image.py (same PIL pipeline, bit-identical in practice).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from transformers import Blip2Processor

from miniblip2.checkpoint.processor import load_processor
from miniblip2.errors import CheckpointError, PromptError
from miniblip2.testing.tiny_tokenizer import (
    build_tiny_processor_files,
    build_tiny_t5_tokenizer,
    build_tiny_tokenizer,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "blip2-opt-2.7b"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference is not beside the repo")
PARITY = 1e-6

PROMPTS = ["Question: which city is this? Answer:", "a", "", "Describe the picture\nin detail, please: 😀"]


def images(n: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(n)
    sizes = [(300, 500), (64, 64), (1, 1), (90, 700)]
    return [PIL.Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def hf():
    return Blip2Processor.from_pretrained(REFERENCE, backend="pil")  # PIL resizing, as miniblip2


@pytest.fixture(scope="module")
def ours():
    return load_processor(REFERENCE)


def hf_call(processor, padding_side="right", **kwargs) -> dict[str, np.ndarray]:
    return dict(processor(**kwargs, padding=True, padding_side=padding_side, return_tensors="np"))


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in ("input_ids", "attention_mask"):
        if key in expected:
            assert got[key].dtype == expected[key].dtype == np.int64, key
            assert got[key].tolist() == expected[key].tolist(), key
    if "pixel_values" in expected:
        assert got["pixel_values"].shape == expected["pixel_values"].shape
        assert np.abs(got["pixel_values"] - expected["pixel_values"]).max() <= PARITY


@needs_reference
def test_loaded_settings(ours):
    assert (ours.num_query_tokens, ours.image_token_id) == (32, 50265)
    assert (ours.image_config.height, ours.image_config.width) == (224, 224)


@needs_reference
def test_single_prompt_with_image(hf, ours):
    got = ours(images=images(1), text=PROMPTS[0])
    assert_same(got, hf_call(hf, images=images(1), text=PROMPTS[0]))
    # CHECKPOINTS.md 1.6: 32 x <image>, then </s>, then the prompt.
    assert got["input_ids"][0].tolist() == [50265] * 32 + [2, 45641, 35, 61, 343, 16, 42, 116, 31652, 35]


@needs_reference
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_prompts_of_different_lengths(hf, ours, side):
    got = ours(images=images(4), text=PROMPTS, padding_side=side)
    assert_same(got, hf_call(hf, side, images=images(4), text=PROMPTS))
    assert got["input_ids"].shape == (4, 32 + max(len(ours.tokenizer.encode(p)) for p in PROMPTS))


@needs_reference
def test_left_padding_puts_pads_between_image_tokens_and_bos(ours):
    # Upstream pads the prompts, then prepends the image ids; so do we (see processor.py).
    got = ours(images=images(2), text=["a b c", "a"])
    assert got["input_ids"][1, 30:].tolist() == [50265, 50265, 1, 1, 2, 102]
    assert got["attention_mask"][1, 30:].tolist() == [1, 1, 0, 0, 1, 1]


@needs_reference
def test_default_padding_side_is_left(ours):
    assert ours(text=["a b c", "a"])["input_ids"][1].tolist() == [1, 1, 2, 102]


@needs_reference
def test_images_only_and_text_only(hf, ours):
    got = ours(images=images(2))
    assert got.keys() == {"pixel_values"}  # upstream: no input_ids at all, the model builds them
    assert_same(got, hf_call(hf, images=images(2)))
    for side in ("left", "right"):
        assert_same(ours(text=PROMPTS, padding_side=side), hf_call(hf, side, text=PROMPTS))


@needs_reference
def test_one_prompt_for_several_images_is_refused(hf, ours):
    # Upstream returns mismatched batches (1 prompt row, 3 images) that fail later in the model.
    upstream = hf_call(hf, images=images(3), text="a photo of")
    assert upstream["input_ids"].shape[0] == 1 and upstream["pixel_values"].shape[0] == 3
    with pytest.raises(PromptError, match=r"3 images but 1 prompts.*\[prompt\] \* 3"):
        ours(images=images(3), text="a photo of")
    with pytest.raises(PromptError, match="1 images but 2 prompts"):
        ours(images=images(1)[0], text=["a", "b"])


# ---------------------------------------------------------------------------------------------
# A tiny checkpoint folder: what other tests use to build tiny models. Runs without ../shared.

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-processor")
    build_tiny_tokenizer(folder, 500)
    build_tiny_processor_files(folder, image_size=30, num_query_tokens=4)
    (folder / "config.json").write_text(json.dumps({"model_type": "blip-2", "image_token_index": 499,
                                                    "num_query_tokens": 4}))
    return folder


@pytest.mark.parametrize("side", ["left", "right"])
def test_tiny_folder_matches_blip2_processor(tiny_folder, side):
    hf = Blip2Processor.from_pretrained(tiny_folder, backend="pil")
    ours = load_processor(tiny_folder)
    assert (ours.num_query_tokens, ours.image_token_id, ours.tokenizer.vocab_size) == (4, 499, 500)
    prompts = ["a woman sitting on the beach", "Question: what is this? Answer:", "\n"]
    got = ours(images=images(3), text=prompts, padding_side=side)
    assert got["pixel_values"].shape == (3, 3, 30, 30)
    assert_same(got, hf_call(hf, side, images=images(3), text=prompts))


def copy_folder(source: Path, target: Path, without=()) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*without))
    return target


def test_num_query_tokens_falls_back_to_config_json(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "f", without=["processor_config.json"])
    assert load_processor(folder).num_query_tokens == 4
    (folder / "config.json").write_text(json.dumps({"image_token_index": 499}))
    with pytest.raises(CheckpointError, match="num_query_tokens"):
        load_processor(folder)


def test_image_token_mismatch_and_missing_folder(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "f")
    (folder / "config.json").write_text(json.dumps({"image_token_index": 12, "num_query_tokens": 4}))
    with pytest.raises(CheckpointError, match="image_token_index 12 but the tokenizer's <image> is id 499"):
        load_processor(folder)
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        load_processor(tmp_path / "nowhere")
    folder = copy_folder(tiny_folder, tmp_path / "g", without=["preprocessor_config.json"])
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_processor(folder)


def test_bad_calls(tiny_folder):
    ours = load_processor(tiny_folder)
    with pytest.raises(PromptError, match="give images, text or both"):
        ours()
    with pytest.raises(PromptError, match="padding_side"):
        ours(text="a", padding_side="middle")
    with pytest.raises(PromptError, match="list of str"):
        ours(text=["a", 3])
    with pytest.raises(PromptError, match="non-empty list"):
        ours(text=[])


# ---------------------------------------------------------------------------------------------
# Flan-T5 checkpoints: the real blip2-flan-t5-xl files, then a tiny T5 folder (no ../shared).

T5_REFERENCE = REFERENCE.parent / "blip2-flan-t5-xl"
needs_t5_reference = pytest.mark.skipif(not T5_REFERENCE.is_dir(), reason=f"{T5_REFERENCE} is absent")


@pytest.fixture(scope="module")
def hf_t5():
    return Blip2Processor.from_pretrained(T5_REFERENCE, backend="pil")


@pytest.fixture(scope="module")
def ours_t5():
    return load_processor(T5_REFERENCE)


@needs_t5_reference
def test_t5_settings_and_single_prompt(hf_t5, ours_t5):
    assert (ours_t5.num_query_tokens, ours_t5.image_token_id, ours_t5.padding_side) == (32, 32100, "right")
    got = ours_t5(images=images(1), text=PROMPTS[0])
    assert_same(got, hf_call(hf_t5, images=images(1), text=PROMPTS[0]))
    # 32 x <image>, then the prompt, then </s> (1); no BOS.
    assert got["input_ids"][0].tolist() == [32100] * 32 + [11860, 10, 84, 690, 19, 48, 58, 11801, 10, 1]


@needs_t5_reference
@pytest.mark.parametrize("side", ["left", "right", None])
def test_t5_batched_prompts_of_different_lengths(hf_t5, ours_t5, side):
    # None: our default (right, from config.json) against transformers' default (right).
    got = ours_t5(images=images(4), text=PROMPTS, padding_side=side)
    expected = hf_call(hf_t5, side, images=images(4), text=PROMPTS) if side else dict(
        hf_t5(images=images(4), text=PROMPTS, padding=True, return_tensors="np"))
    assert_same(got, expected)
    assert_same(ours_t5(text=PROMPTS, padding_side=side), hf_call(hf_t5, side or "right", text=PROMPTS))
    assert got["input_ids"].shape == (4, 32 + max(len(ours_t5.tokenizer.encode(p)) for p in PROMPTS))


@needs_t5_reference
def test_t5_default_is_right_padding(ours_t5):
    # Pads (0) after </s>, so the prompt follows the image tokens directly, as when unpadded.
    got = ours_t5(images=images(2), text=["a b c", "a"])
    assert got["input_ids"][1, 30:].tolist() == [32100, 32100, 3, 9, 1, 0, 0, 0, 0]  # "a b c": 7 ids, "a": 3
    assert got["attention_mask"][1, 30:].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def tiny_t5_folder(tmp_path_factory):
    # As the tiny Flan-T5 checkpoints are built: text vocab_size 160, image_token_index 159.
    folder = tmp_path_factory.mktemp("tiny-t5-processor")
    build_tiny_t5_tokenizer(folder, 160)
    build_tiny_processor_files(folder, image_size=30, num_query_tokens=4)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "blip-2", "image_token_index": 159, "num_query_tokens": 4,
        "text_config": {"model_type": "t5", "vocab_size": 160}, "use_decoder_only_language_model": False}))
    return folder


@pytest.mark.parametrize("side", ["left", "right", None])
def test_tiny_t5_folder_matches_blip2_processor(tiny_t5_folder, side):
    hf = Blip2Processor.from_pretrained(tiny_t5_folder, backend="pil")
    ours = load_processor(tiny_t5_folder)
    assert (ours.num_query_tokens, ours.image_token_id, ours.tokenizer.vocab_size) == (4, 159, 160)
    prompts = ["a woman sitting on the beach", "Question: what is this? Answer:", "\n", "x <image> y"]
    got = ours(images=images(4), text=prompts, padding_side=side)
    assert got["pixel_values"].shape == (4, 3, 30, 30)
    assert_same(got, hf_call(hf, side or "right", images=images(4), text=prompts))
    if side != "left":  # right: the prompt ("\n" is just </s>) follows the image ids directly
        assert got["input_ids"][2].tolist()[:6] == [159] * 4 + [1, 0]


def test_padding_side_follows_the_language_model(tiny_t5_folder, tmp_path):
    folder = copy_folder(tiny_t5_folder, tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    cases = [({**config, "use_decoder_only_language_model": True}, "left"),  # the flag wins
             ({k: v for k, v in config.items() if k != "use_decoder_only_language_model"}, "right"),
             ({"image_token_index": 159, "num_query_tokens": 4, "text_config": {"model_type": "opt"}}, "left"),
             ({"image_token_index": 159, "num_query_tokens": 4}, "left")]  # Blip2Config's default: OPT
    for content, side in cases:
        (folder / "config.json").write_text(json.dumps(content))
        assert load_processor(folder).padding_side == side, content
    (folder / "config.json").unlink()
    assert load_processor(folder).padding_side == "left"
