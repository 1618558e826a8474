"""BLIP against transformers 5.23: BlipForConditionalGeneration (captioning, miniblip2.Blip) and
BlipForQuestionAnswering (VQA, miniblip2.BlipQuestionAnswering).

Tiny random checkpoints built by transformers (tests/tiny.py: every parameter re-drawn, every
width different where BLIP allows it) are saved in the hub layout and loaded by both libraries.
Stages must agree within 1e-4 relative (max|ours - reference| / max|reference|, the project's
parity bar: these few layers measure about 1e-6 in float32, a real mistake 1e-2 or more), and
generated ids must be identical for greedy search, beam search, and sampling left with one token
to draw. Half precision is held to test_precision.py's bars: about 5 ulps of float16 (5e-3) and
of bfloat16 (4e-2), since two correct half programs round at different places. Measured:

    stage            float32   float16   bfloat16   (torch's own fp16 logits vs its fp32: 2.6e-3)
    vision           8.3e-7    1.3e-3    9.4e-3
    text encoder     3.8e-7    1.3e-3    9.0e-3
    decoder logits   8.3e-7    2.4e-3    1.7e-2
    answer logits    4.7e-7    8.1e-4    9.7e-3

The real layouts (../shared/reference: config.json, tokenizer and processor files, every weight
name and shape) are checked at cut depth, as tests/test_conformance.py does for BLIP-2.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LAYOUTS, REFERENCE, save_checkpoint
from test_generate import ONE_TOKEN_LEFT
from tiny import (BLIP_BOS, BLIP_PAD, BLIP_SEP, BLIP_VOCAB_SIZE, TINY_VQA_VISION, tiny_blip_config,
                  tiny_blip_model)
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipProcessor

import miniblip2
from miniblip2 import CheckpointError, PromptError, cli
from miniblip2.blip import Blip, BlipQuestionAnswering
from miniblip2.checkpoint.processor import load_blip_processor
from miniblip2.runtime.device import to_numpy
from miniblip2.testing.tiny_tokenizer import build_tiny_bert_tokenizer

TOL = 1e-4
TOL_HALF = {"float16": 5e-3, "bfloat16": 4e-2}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NEW_TOKENS = 10
LARGEST_BLIP_ERRORS = {}  # stage -> largest relative error seen (fp32), for the report

CONFIGS = {
    "caption": tiny_blip_config(),
    # other head splits (5 x 8 vision, 3 x 12 text), 3 text layers, 5 px patches
    "caption-3-layers": tiny_blip_config(vision=dict(num_attention_heads=5, image_size=25, patch_size=5),
                                         text=dict(num_attention_heads=3, num_hidden_layers=3)),
    "vqa": tiny_blip_config(vision=TINY_VQA_VISION),
}


def rel_error(ours, theirs):
    theirs = theirs.detach().float().cpu().double().numpy()
    return np.abs(to_numpy(ours).astype(np.float64) - theirs).max() / np.abs(theirs).max()


def note(errors):
    for stage, error in errors.items():
        LARGEST_BLIP_ERRORS[stage] = max(error, LARGEST_BLIP_ERRORS.get(stage, 0.0))


def add_processor_files(folder, image_size):
    """The tiny BERT tokenizer ([DEC] its last id, as the model's BOS) and a BLIP preprocessor."""
    assert build_tiny_bert_tokenizer(folder, BLIP_VOCAB_SIZE - 1) == BLIP_BOS
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor", "resample": 3,
        "size": {"height": image_size, "width": image_size}, "do_resize": True, "do_normalize": True}))


@pytest.fixture(scope="session")
def blip_checkpoint(tmp_path_factory):
    """blip_checkpoint(name, layout, dtype) -> folder of a tiny BLIP with its processor files."""
    made = {}

    def make(name="caption", layout="single", dtype=torch.float32):
        if (name, layout, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"blip-{name}-{layout}-{str(dtype)[6:]}")
            save_checkpoint(tiny_blip_model(CONFIGS[name], question_answering=name == "vqa"), folder, layout, dtype)
            add_processor_files(folder, CONFIGS[name].vision_config.image_size)
            made[name, layout, dtype] = folder
        return made[name, layout, dtype]

    return make


def reference(folder, dtype="float32"):
    name = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    cls = BlipForQuestionAnswering if name == "BlipForQuestionAnswering" else BlipForConditionalGeneration
    return cls.from_pretrained(folder, dtype=TORCH[dtype], attn_implementation="eager").eval()


def image_batch(config, batch, seed):
    size = config.vision.image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def texts(lengths, seed, side="right"):
    """[CLS], n random word ids, [SEP] per row, padded with [PAD] on `side`: BlipProcessor's layout."""
    rng = np.random.default_rng(seed)
    width = max(lengths) + 2
    ids, mask = np.full((len(lengths), width), BLIP_PAD, dtype=np.int64), np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        columns = slice(0, n + 2) if side == "right" else slice(width - n - 2, None)
        ids[row, columns] = [2, *rng.integers(5, BLIP_BOS, size=n), BLIP_SEP]
        mask[row, columns] = 1
    return ids, mask


def tensors(**arrays):  # fresh copies: transformers' caption generate writes [DEC] into its input_ids
    return {name: torch.tensor(array) for name, array in arrays.items() if array is not None}


# --- every stage, float32 -----------------------------------------------------------------------

@pytest.mark.parametrize("layout,dtype", LAYOUTS, ids=[f"{a}-{str(b)[6:]}" for a, b in LAYOUTS])
@pytest.mark.parametrize("name", ["caption", "caption-3-layers"])
def test_caption_stages_match(blip_checkpoint, name, layout, dtype):
    folder = blip_checkpoint(name, layout, dtype)
    ours, theirs = miniblip2.load(folder), reference(folder)
    assert type(ours) is Blip
    pixels = image_batch(ours.config, 2, seed=1)
    ids, mask = texts([3, 7], seed=2)
    with torch.no_grad():
        image_embeds = theirs.vision_model(torch.from_numpy(pixels)).last_hidden_state
        logits = theirs(pixel_values=torch.from_numpy(pixels), **tensors(input_ids=ids, attention_mask=mask)).logits
    real = torch.from_numpy(mask == 1)  # padded positions are undefined in both libraries
    errors = {"vision": rel_error(ours.vision(pixels), image_embeds),
              "decoder logits": rel_error(ours.text_logits(image_embeds.numpy(), ids, mask)[mask == 1], logits[real]),
              "forward": rel_error(ours.forward(pixels, ids, mask)[mask == 1], logits[real])}
    note(errors)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("layout,dtype", LAYOUTS, ids=[f"{a}-{str(b)[6:]}" for a, b in LAYOUTS])
def test_vqa_stages_match(blip_checkpoint, layout, dtype):
    folder = blip_checkpoint("vqa", layout, dtype)
    ours, theirs = miniblip2.load(folder), reference(folder)
    assert type(ours) is BlipQuestionAnswering
    pixels = image_batch(ours.config, 2, seed=3)
    ids, mask = texts([2, 6], seed=4)
    answers = np.array([[BLIP_BOS, 11, 40, 7], [BLIP_BOS, 90, 90, 3]])
    with torch.no_grad():
        image_embeds = theirs.vision_model(torch.from_numpy(pixels)).last_hidden_state
        question = theirs.text_encoder(encoder_hidden_states=image_embeds,
                                       **tensors(input_ids=ids, attention_mask=mask)).last_hidden_state
        logits = theirs.text_decoder(encoder_hidden_states=question, **tensors(input_ids=answers)).logits
    real = torch.from_numpy(mask == 1)
    ours_question = ours.encode_question(image_embeds.numpy(), ids, mask)
    errors = {"vision": rel_error(ours.vision(pixels), image_embeds),
              "text encoder": rel_error(ours_question[mask == 1], question[real]),
              "answer logits": rel_error(ours.answer_logits(question.numpy(), answers), logits),
              "forward": rel_error(ours.forward(pixels, ids, answers, mask), logits)}
    note(errors)
    assert max(errors.values()) < TOL, errors


# transformers' BlipTextAttention does not pass encoder_attention_mask on, so no cross-attention
# is ever masked: the VQA decoder reads the padding of a batched question in forward too.
def test_cross_attention_ignores_the_question_mask_as_transformers_does(blip_checkpoint):
    folder = blip_checkpoint("vqa")
    ours, theirs = miniblip2.load(folder), reference(folder)
    question = np.random.default_rng(5).standard_normal((2, 6, 36)).astype(np.float32)
    answers = np.array([[BLIP_BOS, 11, 40], [BLIP_BOS, 9, 3]])
    with torch.no_grad():
        masked = theirs.text_decoder(encoder_hidden_states=torch.from_numpy(question),
                                     encoder_attention_mask=torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]]),
                                     **tensors(input_ids=answers)).logits
        unmasked = theirs.text_decoder(encoder_hidden_states=torch.from_numpy(question),
                                       **tensors(input_ids=answers)).logits
    assert torch.equal(masked, unmasked)
    assert rel_error(ours.answer_logits(question, answers), unmasked) < TOL


# --- generation: every strategy, transformers' ids ------------------------------------------------

@pytest.fixture(scope="module", params=["caption", "vqa"])
def models(request, blip_checkpoint):
    folder = blip_checkpoint(request.param)
    return request.param, miniblip2.load(folder, progress=False), reference(folder)


@pytest.fixture(scope="module")
def batch(models):
    """Four images and four prompts (caption prefixes or questions) of different lengths, padded on
    the right as BlipProcessor pads them."""
    _, ours, _ = models
    return (image_batch(ours.config, 4, seed=6), *texts([1, 5, 3, 8], seed=7))


# transformers' BLIP generate. It passes eos_token_id ([SEP]) and pad_token_id to the text
# decoder itself and refuses them from the caller (TypeError), so when a test sets them (other
# EOS ids end rows and beams far more often than [SEP] does in a random model), this runs the
# body of BlipForConditionalGeneration.generate / BlipForQuestionAnswering.generate as written
# in transformers 5.23 with those two values replaced.
@torch.no_grad()
def reference_generate(kind, theirs, pixels, ids, mask, **kwargs):
    inputs = tensors(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    if not {"eos_token_id", "pad_token_id"} & set(kwargs):
        return theirs.generate(**inputs, **kwargs).numpy()
    text = theirs.config.text_config
    kwargs = {"eos_token_id": text.sep_token_id, "pad_token_id": text.pad_token_id} | kwargs
    image_embeds = theirs.vision_model(pixel_values=inputs["pixel_values"])[0]
    image_mask = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
    if kind == "vqa":
        question = theirs.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                       return_dict=False)[0]
        start = torch.full((question.size(0), 1), fill_value=text.bos_token_id)
        return theirs.text_decoder.generate(input_ids=start, encoder_hidden_states=question,
                                            encoder_attention_mask=torch.ones(question.size()[:-1], dtype=torch.long),
                                            **kwargs).numpy()
    empty = torch.LongTensor([[text.bos_token_id, text.eos_token_id]]).repeat(len(pixels), 1)
    input_ids = inputs.get("input_ids", empty)
    input_ids[:, 0] = text.bos_token_id
    mask = inputs["attention_mask"][:, :-1] if "attention_mask" in inputs else None
    return theirs.text_decoder.generate(input_ids=input_ids[:, :-1], attention_mask=mask,
                                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                        **kwargs).numpy()


def both(models, batch, rows=4, prompt=True, **kwargs):
    """(ours, transformers') ids for the first `rows` inputs of `batch`, same arguments."""
    kind, ours, theirs = models
    pixels, ids, mask = (a[:rows] for a in batch)
    ids, mask = (ids, mask) if prompt else (None, None)
    return ours.generate(pixels, ids, mask, **kwargs), reference_generate(kind, theirs, pixels, ids, mask, **kwargs)


def test_the_reference_is_transformers_generate(models, batch):
    kind, _, theirs = models
    pixels, ids, mask = batch
    with torch.no_grad():
        expected = theirs.generate(**tensors(pixel_values=pixels, input_ids=ids, attention_mask=mask), max_new_tokens=6)
    text = theirs.config.text_config
    np.testing.assert_array_equal(reference_generate(kind, theirs, pixels, ids, mask, max_new_tokens=6,
                                                     eos_token_id=text.sep_token_id), expected.numpy())


def assert_same(got, expected):
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def frequent(models, batch):
    """The two ids greedy search emits most: as EOS ids they end rows and beams at different steps
    (the real [SEP] is rare in a random model and would leave the stopping code untested)."""
    got, _ = both(models, batch, max_new_tokens=20)
    new = got[:, -20:]
    values, counts = np.unique(new, return_counts=True)
    return [int(v) for v in values[np.argsort(-counts, kind="stable")[:2]]]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("rows", [1, 4])
def test_greedy_matches_transformers(models, batch, frequent, rows, use_cache):
    got, expected = both(models, batch, rows, max_new_tokens=NEW_TOKENS, eos_token_id=frequent, use_cache=use_cache)
    assert_same(got, expected)
    assert (got[:, 0] == BLIP_BOS).all()  # [DEC] first, in place of the caption prefix's [CLS]


def test_greedy_with_the_default_length_and_stop(models, batch):
    """No settings at all: 20 new tokens, stopping at [SEP] and padding with [PAD]."""
    assert_same(*both(models, batch))
    if models[0] == "caption":  # no prefix: generation starts from [DEC] alone
        got, expected = both(models, batch, prompt=False)
        assert_same(got, expected)
        assert got.shape[1] <= 21


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 2.0])
@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_beam_search_matches_transformers(models, batch, frequent, num_beams, length_penalty, early_stopping):
    got, expected = both(models, batch, 3, max_new_tokens=NEW_TOKENS, num_beams=num_beams,
                         num_return_sequences=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                         eos_token_id=frequent)
    assert_same(got, expected)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_with_and_without_cache(models, batch, frequent, use_cache):
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, eos_token_id=frequent,
                  no_repeat_ngram_size=2, use_cache=use_cache)
    assert_same(*both(models, batch, **kwargs))


CONTROLS = [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2), dict(min_new_tokens=6),
            dict(max_length=12), dict(pad_token_id=7)]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("controls", CONTROLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_logits_controls_match_transformers(models, batch, frequent, controls, num_beams):
    lengths = {} if "max_length" in controls else dict(max_new_tokens=NEW_TOKENS)
    assert_same(*both(models, batch, num_beams=num_beams, eos_token_id=frequent, **lengths, **controls))


@pytest.mark.parametrize("kwargs", ONE_TOKEN_LEFT)
def test_sampling_restricted_to_one_token_matches_transformers(models, batch, frequent, kwargs):
    got, expected = both(models, batch, max_new_tokens=NEW_TOKENS, do_sample=True, eos_token_id=frequent, **kwargs)
    assert_same(got, expected)


# The first sampled token of 20,000 samples must follow the softmax of the model's own first
# logits (temperature and top-k applied): within 6 standard deviations per token (a correct
# sampler fails for fewer than 1 seed in 10^7); seeded, so deterministic.
def test_sampled_first_tokens_follow_the_model_distribution(models, batch):
    kind, ours, _ = models
    pixels, ids, mask = batch[0][:1], batch[1][:1, :3], batch[2][:1, :3]  # row 0: [CLS] w [SEP], unpadded
    draws = 20_000
    got = ours.generate(pixels, ids, mask, do_sample=True, max_new_tokens=1, num_return_sequences=draws,
                        temperature=0.7, top_k=12, seed=0)
    start = np.array([[BLIP_BOS]])
    if kind == "vqa":
        logits = ours.forward(pixels, ids, start, mask)[0, -1]
        new = got[:, 1]
    else:
        logits = ours.forward(pixels, np.concatenate([start, ids[:, 1:-1]], axis=1))[0, -1]
        new = got[:, -1]
    logits = logits.astype(np.float64) / 0.7
    logits[logits < np.sort(logits)[-12]] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    counts = np.bincount(new, minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    expected = draws * probs
    assert np.all(np.abs(counts - expected) <= 6 * np.sqrt(expected * (1 - probs)) + 1e-9)


def test_sampling_is_reproducible_and_laid_out_as_transformers(models, batch):
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_p=0.9, num_return_sequences=2)
    first = models[1].generate(*batch, seed=3, **kwargs)
    np.testing.assert_array_equal(models[1].generate(*batch, seed=3, **kwargs), first)
    _, expected = both(models, batch, **kwargs)
    assert first.shape[0] == expected.shape[0] == 8


def test_position_interpolation_matches_transformers(blip_checkpoint):
    """Images larger than trained (60 x 67 px for 30 x 30): the position table resampled."""
    folder = blip_checkpoint("caption")
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = np.random.default_rng(23).standard_normal((2, 3, 60, 67)).astype(np.float32)
    with torch.no_grad():
        image_embeds = theirs.vision_model(torch.from_numpy(pixels), interpolate_pos_encoding=True).last_hidden_state
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels), interpolate_pos_encoding=True,
                                   max_new_tokens=NEW_TOKENS).numpy()
    assert rel_error(ours.vision(pixels, interpolate_pos_encoding=True), image_embeds) < TOL
    assert_same(ours.generate(pixels, interpolate_pos_encoding=True, max_new_tokens=NEW_TOKENS), expected)


# --- what transformers' generate does to prompts ------------------------------------------------

def test_caption_prompt_quirks_are_transformers(blip_checkpoint):
    """generate swaps the first column for [DEC] (in the caller's own tensor, too) and drops the
    last: a right-padded shorter prefix keeps its [SEP] and continues after its padding. Both
    libraries give the same ids for that; left padding with [DEC] in each row (what caption
    builds) gives every row its own unpadded caption."""
    folder = blip_checkpoint("caption")
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = image_batch(ours.config, 2, seed=8)
    ids, mask = texts([6, 2], seed=9)
    theirs_ids = torch.tensor(ids)
    with torch.no_grad():
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels), input_ids=theirs_ids,
                                   attention_mask=torch.tensor(mask), max_new_tokens=NEW_TOKENS).numpy()
    assert (theirs_ids[:, 0] == BLIP_BOS).all()  # the caller's tensor was written to
    got = ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS)
    assert_same(got, expected)
    assert got[1, 3] == BLIP_SEP and ids[0, 0] == 2  # the short row's [SEP] stays; our input is untouched
    left, left_mask = texts([6, 2], seed=9, side="left")
    left[np.arange(2), left_mask.argmax(axis=1)] = BLIP_BOS
    with torch.no_grad():
        alone = theirs.generate(pixel_values=torch.from_numpy(pixels[1:]), max_new_tokens=NEW_TOKENS,
                                **tensors(input_ids=ids[1:, :4]))  # the short row by itself, unpadded
    np.testing.assert_array_equal(ours.generate(pixels, left, left_mask, max_new_tokens=NEW_TOKENS)[1, 4:],
                                  alone.numpy()[0])


# --- half precision against torch in the same dtype ---------------------------------------------

@pytest.mark.parametrize("dtype", list(TOL_HALF))
@pytest.mark.parametrize("name", ["caption", "vqa"])
def test_stages_match_in_half(blip_checkpoint, name, dtype):
    folder = blip_checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype=dtype), reference(folder, dtype)
    pixels = image_batch(ours.config, 2, seed=10)
    ids, mask = texts([3, 6], seed=11)
    real = torch.from_numpy(mask == 1)
    with torch.no_grad():
        pixel_values = torch.from_numpy(pixels).to(TORCH[dtype])
        image_embeds = theirs.vision_model(pixel_values).last_hidden_state
        errors = {"vision": rel_error(ours.vision(pixels), image_embeds)}
        embeds = image_embeds.float().numpy()
        if name == "caption":
            logits = theirs(pixel_values=pixel_values, **tensors(input_ids=ids, attention_mask=mask)).logits
            errors["decoder logits"] = rel_error(ours.text_logits(embeds, ids, mask)[mask == 1], logits[real])
        else:
            question = theirs.text_encoder(encoder_hidden_states=image_embeds,
                                           **tensors(input_ids=ids, attention_mask=mask)).last_hidden_state
            answers = np.array([[BLIP_BOS, 9, 33], [BLIP_BOS, 70, 70]])
            logits = theirs.text_decoder(encoder_hidden_states=question, **tensors(input_ids=answers)).logits
            errors["text encoder"] = rel_error(ours.encode_question(embeds, ids, mask)[mask == 1], question[real])
            errors["answer logits"] = rel_error(ours.answer_logits(question.float().numpy(), answers), logits)
    LARGEST_BLIP_ERRORS.update({f"{stage} {dtype}": max(e, LARGEST_BLIP_ERRORS.get(f"{stage} {dtype}", 0))
                                for stage, e in errors.items()})
    assert max(errors.values()) < TOL_HALF[dtype], errors


@pytest.mark.parametrize("name", ["caption", "vqa"])
def test_greedy_ids_identical_in_float16(blip_checkpoint, name):
    folder = blip_checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype="float16"), reference(folder, "float16")
    pixels = image_batch(ours.config, 3, seed=12)
    ids, mask = texts([2, 5, 1], seed=13)
    inputs = tensors(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    inputs["pixel_values"] = inputs["pixel_values"].half()
    with torch.no_grad():
        expected = theirs.generate(**inputs, max_new_tokens=NEW_TOKENS).numpy()
    assert_same(ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS), expected)


# bfloat16 keeps 8 bits, so torch's own top two logits are often tied or one step apart, and
# any correct bf16 program may then pick the other (test_precision.py). Identical ids, except
# that a row may part where transformers' logit for its token beats ours by at most TOL_HALF of
# the largest logit; after that the rows continue from different texts. No prefix, so every
# row's positions are 0, 1, ... in generate and in forward alike.
def test_greedy_ids_identical_in_bfloat16_up_to_ties(blip_checkpoint):
    folder = blip_checkpoint("caption")
    ours, theirs = miniblip2.load(folder, dtype="bfloat16"), reference(folder, "bfloat16")
    pixels = image_batch(ours.config, 4, seed=14)
    pixel_values = torch.from_numpy(pixels).bfloat16()
    with torch.no_grad():
        expected = theirs.generate(pixel_values=pixel_values, max_new_tokens=NEW_TOKENS).numpy()
    got = ours.generate(pixels, max_new_tokens=NEW_TOKENS)
    assert got.shape == expected.shape
    for row in np.flatnonzero((got != expected).any(axis=1)):
        at = int(np.argmax(got[row] != expected[row]))
        with torch.no_grad():
            logits = theirs(pixel_values=pixel_values[row:row + 1],
                            input_ids=torch.tensor(expected[row:row + 1, :at])).logits[0, -1].float().numpy()
        assert logits[expected[row, at]] - logits[got[row, at]] <= TOL_HALF["bfloat16"] * np.abs(logits).max()


def test_no_module_stays_float32(blip_checkpoint):
    half = miniblip2.load(blip_checkpoint("vqa"), dtype="float16")
    assert half.weights["text_encoder"]["encoder"]["layer"][0]["crossattention"]["self"]["key"]["weight"].dtype == \
        np.float16 and half.weights["text_decoder"]["cls"]["predictions"]["bias"].dtype == np.float16


# --- images and text in, text out ---------------------------------------------------------------

def picture(seed, size=30):
    return np.random.default_rng(seed).integers(0, 256, size=(size, size + 7, 3), dtype=np.uint8)


def test_processor_matches_blip_processor(blip_checkpoint):
    folder = blip_checkpoint("caption")
    theirs = BlipProcessor.from_pretrained(folder, backend="pil")  # PIL resizing, as miniblip2 (not torchvision)
    prompts = ["a photography of", "how many dogs are in the picture?", "x"]
    images = [picture(i) for i in range(3)]
    expected = theirs(images=images, text=prompts, padding=True, return_tensors="np")
    got = load_blip_processor(folder)(images=images, text=prompts)
    assert sorted(got) == sorted(expected)  # no token_type_ids, as BlipProcessor
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_is_transformers_text_for_each_image(blip_checkpoint, num_beams):
    """Prefixes of three lengths in one call: each caption is the text transformers writes for
    that image and prefix alone (caption pads on the left; see test_caption_prompt_quirks)."""
    folder = blip_checkpoint("caption")
    ours, theirs = miniblip2.load(folder), reference(folder)
    processor = BlipProcessor.from_pretrained(folder, backend="pil")
    prompts = ["a photography of", "a", "two dogs on the beach with a"]
    images = [picture(i) for i in range(3)]
    expected = []
    for image, prompt in zip(images, prompts):
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = theirs.generate(**inputs, max_new_tokens=8, num_beams=num_beams)
        expected.append(processor.decode(ids[0, inputs["input_ids"].shape[1] - 1:], skip_special_tokens=True).strip())
    assert ours.caption(images, prompt=prompts, max_new_tokens=8, num_beams=num_beams) == expected
    inputs = processor(images=images[0], return_tensors="pt")
    with torch.no_grad():  # no prefix: from [DEC]
        ids = theirs.generate(**inputs, max_new_tokens=8)
    assert ours.caption(images[0], max_new_tokens=8) == processor.decode(ids[0], skip_special_tokens=True).strip()


def test_answer_is_transformers_text_for_each_question(blip_checkpoint):
    folder = blip_checkpoint("vqa")
    ours, theirs = miniblip2.load(folder), reference(folder)
    processor = BlipProcessor.from_pretrained(folder, backend="pil")
    questions = ["what is this", "how many dogs are in the picture?", "what is this"]
    images = [picture(i + 5) for i in range(3)]
    expected = []
    for image, question in zip(images, questions):
        with torch.no_grad():
            ids = theirs.generate(**processor(images=image, text=question, return_tensors="pt"), max_new_tokens=6)
        expected.append(processor.decode(ids[0], skip_special_tokens=True).strip())
    assert ours.answer(images, questions, max_new_tokens=6) == expected
    assert ours.answer(images[1], questions[1], max_new_tokens=6) == expected[1]


@pytest.mark.parametrize("name,text", [("caption", "a photography of"), ("vqa", "what is this")])
def test_stream_pieces_join_to_the_text(blip_checkpoint, name, text):
    ours = miniblip2.load(blip_checkpoint(name))
    whole = ours.answer if name == "vqa" else ours.caption
    for i, kwargs in enumerate([dict(), dict(do_sample=True, seed=2)]):
        pieces = list(ours.stream(picture(i), text, max_new_tokens=12, **kwargs))
        assert "".join(pieces) == whole(picture(i), text, max_new_tokens=12, **kwargs) and len(pieces) > 1


def test_trace_names_are_checkpoint_paths(blip_checkpoint):
    ours = miniblip2.load(blip_checkpoint("vqa"))
    t = ours.trace(picture(0), "what is this")
    L = len(ours.processor.tokenizer.encode("what is this"))
    layer = "text_decoder.bert.encoder.layer.1"
    assert t[f"{layer}.crossattention.self.probs"].shape == (1, 4, 1, L)  # [B, H, T, L]: [DEC] reads the question
    assert t["text_encoder.encoder.layer.0.crossattention.self.probs"].shape == (1, 4, L, 26)  # 5 x 5 patches + CLS
    assert t["vision_model.post_layernorm"].shape == (1, 26, 36)
    assert t["text_decoder.cls.predictions.decoder"].shape == (1, 1, BLIP_VOCAB_SIZE)
    image_embeds = ours.vision(ours.processor(images=[picture(0)])["pixel_values"])
    np.testing.assert_array_equal(t["vision_model.post_layernorm"], image_embeds)


def test_cli_caption_and_ask(blip_checkpoint, capsys):
    caption_folder, vqa_folder = blip_checkpoint("caption"), blip_checkpoint("vqa")
    image = Path(caption_folder) / "picture.png"
    from PIL import Image
    Image.fromarray(picture(3)).save(image)
    assert cli.main(["caption", str(image), "--weights", str(caption_folder), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == miniblip2.load(caption_folder).caption(image, max_new_tokens=5)
    assert cli.main(["ask", str(image), "what is this", "--weights", str(vqa_folder), "--max-new-tokens", "5",
                     "--num-beams", "2"]) == 0
    expected = miniblip2.load(vqa_folder).answer(image, "what is this", max_new_tokens=5, num_beams=2)
    assert capsys.readouterr().out.strip() == expected
    assert cli.main(["ask", str(image), "what is this", "--weights", str(caption_folder)]) == 2
    assert "BlipForQuestionAnswering" in capsys.readouterr().err
    assert cli.main(["caption", str(image), "--weights", str(vqa_folder)]) == 2
    assert "answer(image, question)" in capsys.readouterr().err


def test_ask_wraps_the_question_for_blip2(talking_checkpoint):
    model = miniblip2.load(talking_checkpoint)
    image = picture(4)
    assert model.answer(image, "what is it?", max_new_tokens=4) == \
        model.caption(image, prompt="Question: what is it? Answer:", max_new_tokens=4)


# --- the namespace rule and the device: BLIP's code on StrictArrays ------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["caption", "vqa"])
def test_blip_runs_through_the_namespace(blip_checkpoint, name, dtype):
    from strict_numpy import StrictArray, to_strict
    plain = miniblip2.load(blip_checkpoint(name), dtype=dtype, device="cpu")
    checked = type(plain)(plain.config, to_strict(plain.weights), plain.processor)
    pixels = image_batch(plain.config, 2, seed=15)
    ids, mask = texts([2, 4], seed=16)
    answers = np.array([[BLIP_BOS, 5, 6], [BLIP_BOS, 7, 7]])

    def forward(model, pixel_values):
        return model.forward(pixel_values, ids, answers, mask) if name == "vqa" else model.forward(pixel_values, ids, mask)

    np.testing.assert_array_equal(forward(checked, pixels.view(StrictArray)), forward(plain, pixels))
    for kwargs in [{}, {"num_beams": 3, "no_repeat_ngram_size": 2}, {"do_sample": True, "top_k": 20, "seed": 0}]:
        np.testing.assert_array_equal(checked.generate(pixels.view(StrictArray), ids, mask, max_new_tokens=6, **kwargs),
                                      plain.generate(pixels, ids, mask, max_new_tokens=6, **kwargs))


# Every token is forced (min_new_tokens), so greedy runs exactly N steps: one copy to the host a
# step (the chosen ids) and one for the prompt ids, as for BLIP-2 (test_namespace.py).
def test_one_host_transfer_per_generated_token(blip_checkpoint):
    from strict_numpy import DeviceArray, to_strict
    plain = miniblip2.load(blip_checkpoint("caption"), device="cpu")
    device = Blip(plain.config, to_strict(plain.weights, DeviceArray), plain.processor)
    pixels = image_batch(plain.config, 2, seed=17)
    ids, mask = texts([2, 4], seed=18)
    DeviceArray.host_transfers[0] = 0
    got = device.generate(pixels, ids, mask, max_new_tokens=7, min_new_tokens=7)
    assert DeviceArray.host_transfers[0] == 7 + 1
    np.testing.assert_array_equal(got, plain.generate(pixels, ids, mask, max_new_tokens=7, min_new_tokens=7))


# --- bad input: one clear error, at load where possible ------------------------------------------

def edited_copy(folder, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["vision_config"].update(hidden_size=40, num_attention_heads=4),
     "vision_config.hidden_size = 40 but text_config.hidden_size = 36"),
    (lambda c: c["text_config"].update(is_decoder=False), "without cross-attention"),
    (lambda c: c["text_config"].update(sep_token_id=None), "sep_token_id is null"),
    (lambda c: c["text_config"].update(hidden_act="swish"), "hidden_act"),
    (lambda c: c.update(model_type="blip-2"), "model_type 'blip-2'"),
    (lambda c: c["text_config"].update(num_hidden_layers=3), "missing"),
])
def test_bad_configs_are_refused_at_load(blip_checkpoint, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        miniblip2.load(edited_copy(blip_checkpoint("vqa"), tmp_path, edit))


def test_bad_requests_say_what_to_do(blip_checkpoint):
    caption, vqa = miniblip2.load(blip_checkpoint("caption")), miniblip2.load(blip_checkpoint("vqa"))
    pixels = image_batch(caption.config, 1, seed=19)
    with pytest.raises(CheckpointError, match="answer questions"):
        caption.answer(picture(0), "what is this")
    with pytest.raises(CheckpointError, match="does not caption"):
        vqa.caption(picture(0))
    with pytest.raises(PromptError, match="needs the question"):
        vqa.generate(pixels)
    with pytest.raises(PromptError, match="at least 2 columns"):
        caption.generate(pixels, [[2]])
    with pytest.raises(PromptError, match=r"in \[0, 120\)"):
        caption.generate(pixels, [[2, BLIP_VOCAB_SIZE, 3]])
    with pytest.raises(PromptError, match="more than the model's 64 positions"):
        caption.generate(pixels, max_new_tokens=64)
    with pytest.raises(PromptError, match="more than the model's 64 positions"):
        vqa.forward(pixels, np.full((1, 65), 5), [[BLIP_BOS]])
    with pytest.raises(PromptError, match="one question per image"):
        vqa.answer([picture(0), picture(1)], ["a", "b", "c"])
    with pytest.raises(PromptError, match="2 rows of input_ids for 1 images"):
        vqa.generate(pixels, [[2, 5, 3], [2, 6, 3]])


# --- checkpoint files: pytorch_model.bin with buffers, tied output layer --------------------------

def test_pytorch_bin_with_buffers_and_tied_copies_loads(blip_checkpoint, tmp_path):
    """A 2022-style pytorch_model.bin: the position_ids buffers (int64) and the output layer's
    tied copies (decoder.weight sharing the word embeddings' storage, decoder.bias) are in the
    file; both libraries load it and agree."""
    source = miniblip2.load(blip_checkpoint("vqa"))
    model = tiny_blip_model(CONFIGS["vqa"], question_answering=True)
    state = dict(model.state_dict())
    state["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(64)[None]
    assert "text_decoder.cls.predictions.decoder.weight" in state
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "preprocessor_config.json"):
        shutil.copy(Path(blip_checkpoint("vqa")) / name, folder / name)
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = image_batch(source.config, 2, seed=20)
    ids, mask = texts([3, 1], seed=21)
    with torch.no_grad():
        expected = theirs.generate(**tensors(input_ids=ids, pixel_values=pixels, attention_mask=mask),
                                   max_new_tokens=NEW_TOKENS).numpy()
    assert_same(ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS), expected)


def test_a_stored_output_layer_is_used_as_transformers_uses_it(blip_checkpoint, tmp_path):
    """A file holding its own decoder.weight (blip-vqa-base's safetensors does) is read as stored:
    transformers 5.23 then does not tie it to the word embeddings. Here it differs on purpose."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "own-decoder"
    shutil.copytree(blip_checkpoint("caption"), folder)
    state = load_file(folder / "model.safetensors")
    state["text_decoder.cls.predictions.decoder.weight"] = torch.randn(BLIP_VOCAB_SIZE, 36) * 0.2
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = image_batch(ours.config, 1, seed=22)
    ids = np.array([[BLIP_BOS, 9, 10]])
    with torch.no_grad():
        logits = theirs(pixel_values=torch.from_numpy(pixels), **tensors(input_ids=ids)).logits
    assert rel_error(ours.forward(pixels, ids), logits) < TOL


# --- the real layouts (../shared/reference), cut to a few layers ---------------------------------
# Names and shapes are the folder's KEYS tsv (transformers 5.23's state_dict for the real config);
# the weights are random, written as the hub has them: captioning-base and vqa-capfilt-large as
# pytorch_model.bin only (2022 state_dicts: position_ids buffers and the tied copies included),
# captioning-large as a safetensors of parameters only (its refs/pr/18 conversion), vqa-base as
# the safetensors CHECKPOINTS.md 7.1 reconstructs (decoder.weight in, decoder.bias out, two int64
# position_ids). The real config.json (layer counts cut), tokenizer and processor files are used.

REAL = {"blip-image-captioning-base": "bin", "blip-image-captioning-large": "safetensors",
        "blip-vqa-base": "hub-safetensors", "blip-vqa-capfilt-large": "bin"}
CUT = {"vision_model.encoder.layers": 1, "text_decoder.bert.encoder.layer": 2, "text_encoder.encoder.layer": 2}


def real_names(real):
    rows = [line.split("\t") for line in next(real.glob("KEYS.*.tsv")).read_text().splitlines()
            if line and not line.startswith(("#", "name\t"))]
    return {name: tuple(json.loads(shape)) for name, shape, _, kind in rows if kind.strip() == "param"}


def kept(name):
    for prefix, n in CUT.items():
        match = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
        if match:
            return int(match.group(1)) < n
    return True


def write_real_layout(real, folder, how):
    config = json.loads((real / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = CUT["vision_model.encoder.layers"]
    config["text_config"]["num_hidden_layers"] = CUT["text_decoder.bert.encoder.layer"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for small in real.iterdir():
        if small.suffix in (".json", ".txt") and small.name != "config.json" \
                and not small.name.startswith(("pytorch_model", "KEYS", "PREDICTED", "HUB-", "hub-")):
            shutil.copy(small, folder / small.name)
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in real_names(real).items():
        if kept(name):
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if name.endswith(("LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
                values += 1
            state[name] = torch.from_numpy(values)
    words = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    buffers = {f"{p}embeddings.position_ids": torch.arange(512)[None] for p in ("text_decoder.bert.", "text_encoder.")
               if any(n.startswith(p) for n in state)}
    if how == "bin":  # as torch.save(model.state_dict()) wrote it in 2022: ties share storage
        state |= buffers | {"text_decoder.cls.predictions.decoder.weight": words,
                            "text_decoder.cls.predictions.decoder.bias": state["text_decoder.cls.predictions.bias"]}
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        if how == "hub-safetensors":
            state |= buffers | {"text_decoder.cls.predictions.decoder.weight": words.clone()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return state


@pytest.fixture(scope="module", params=list(REAL))
def real_layout(request, tmp_path_factory):
    real = REFERENCE / request.param
    if not real.is_dir():
        pytest.skip(f"{real} is absent (../shared/reference holds the real config and tokenizer files)")
    folder = tmp_path_factory.mktemp(f"{request.param}-cut")
    return real, folder, write_real_layout(real, folder, REAL[request.param])


def test_real_names_and_shapes_load(real_layout):
    real, folder, state = real_layout
    config = BlipConfig.from_pretrained(folder)
    cls = BlipForQuestionAnswering if "vqa" in real.name else BlipForConditionalGeneration
    with torch.device("meta"):  # the names and shapes transformers builds from the cut config
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items() if k in expected} == \
        {k: v for k, v in expected.items() if k in state}
    ours = miniblip2.load(folder)
    assert type(ours) is (BlipQuestionAnswering if "vqa" in real.name else Blip)
    vision = ours.config.vision
    assert (vision.image_size, vision.patch_size, vision.layer_norm_eps) == (384, 16, 1e-5)
    assert ours.config.text.encoder_hidden_size == vision.hidden_size == (1024 if "large" in real.name and
                                                                         "captioning" in real.name else 768)
    text = ours.config.text
    assert (text.num_attention_heads, text.vocab_size, text.bos_token_id, text.sep_token_id) == (12, 30524, 30522, 102)
    assert ours.weights["vision_model"]["embeddings"]["position_embedding"].shape == (1, 577, vision.hidden_size)


def test_real_layout_matches_transformers(real_layout):
    real, folder, _ = real_layout
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = np.random.default_rng(1).standard_normal((1, 3, 384, 384)).astype(np.float32)
    ids = np.array([[101, 2129, 2116, 6077, 2024, 1999, 1996, 3861, 1029, 102]])  # "how many dogs ...?" (7.2)
    with torch.no_grad():
        if "vqa" in real.name:
            answers = np.array([[30522, 1015, 102]])
            question = theirs.text_encoder(input_ids=torch.tensor(ids), encoder_hidden_states=theirs.vision_model(
                torch.from_numpy(pixels)).last_hidden_state).last_hidden_state
            logits = theirs.text_decoder(input_ids=torch.tensor(answers), encoder_hidden_states=question).logits
            got = ours.forward(pixels, ids, answers)
            expected = theirs.generate(**tensors(input_ids=ids, pixel_values=pixels), max_new_tokens=4).numpy()
        else:
            logits = theirs(pixel_values=torch.from_numpy(pixels), input_ids=torch.tensor(ids)).logits
            got = ours.forward(pixels, ids)
            expected = theirs.generate(**tensors(pixel_values=pixels, input_ids=ids), max_new_tokens=4).numpy()
    assert got.shape[-1] == 30524
    error = rel_error(got, logits)
    note({"real layout logits": error})
    assert error < TOL, error
    assert_same(ours.generate(pixels, ids, max_new_tokens=4), expected)


def test_real_processor_files_drive_the_same_text(real_layout):
    from PIL import Image
    real, folder, _ = real_layout
    ours, theirs = miniblip2.load(folder), reference(folder)
    processor = BlipProcessor.from_pretrained(folder, backend="pil")
    image = Path(__file__).resolve().parents[1] / "docs" / "example.png"
    text = "how many dogs are in the picture?" if "vqa" in real.name else "a photography of"
    inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
    with torch.no_grad():
        ids = theirs.generate(**inputs, max_new_tokens=4)
    if "vqa" in real.name:
        assert ours.answer(image, text, max_new_tokens=4) == processor.decode(ids[0], skip_special_tokens=True).strip()
    else:
        start = inputs["input_ids"].shape[1] - 1  # the prefix, less its dropped [SEP]
        assert ours.caption(image, text, max_new_tokens=4) == \
            processor.decode(ids[0, start:], skip_special_tokens=True).strip()
