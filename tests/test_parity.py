"""End to end against transformers: tiny random checkpoints on disk, loaded by both libraries.

Every stage is compared (vision, Q-Former, projection, logits) and the generated ids must be
identical. Relative error = max|ours - reference| / max|reference|, both in float32.
Tolerance 1e-4 (the project's parity bar): the models here are a few layers deep, so float32
rounding gives about 1e-6; a real mistake gives 1e-2 or more. Files stored in fp16 or bf16 are
widened to fp32 by both libraries, so they meet the same bar.
"""

import numpy as np
import pytest
import torch
from conftest import CONFIGS, LAYOUTS
from tiny import EOS_TOKEN, IMAGE_TOKEN, VOCAB_SIZE
from transformers import Blip2ForConditionalGeneration

import miniblip2
from miniblip2.runtime.device import to_numpy

TOL = 1e-4
NEW_TOKENS = 30
LARGEST_ERRORS = {}  # stage -> largest relative error seen this session, printed at the end


def rel_error(ours, theirs):  # ours: NumPy or CuPy (the stages give arrays on the model's device)
    theirs = theirs.detach().cpu().double().numpy()
    return np.abs(to_numpy(ours).astype(np.float64) - theirs).max() / np.abs(theirs).max()


def reference(folder):
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def batch_of_three(config):
    """Three images and three prompt lengths (so left padding): the batch generation is checked on."""
    return image_batch(config, 3, seed=3), *prompts(config, [1, 4, 9], seed=4)


def image_batch(config, batch, seed, scale=1):
    size = config.vision.image_size * scale
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, size, size + config.vision.patch_size * (scale - 1))).astype(np.float32)


def prompts(config, lengths, seed):
    """`<image>` x Q, BOS, then `n` random text ids per row, left-padded with pad id 1."""
    rng = np.random.default_rng(seed)
    Q, longest = config.num_query_tokens, max(lengths)
    ids = np.ones((len(lengths), Q + 1 + longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        text = rng.integers(11, VOCAB_SIZE - 1, size=n)  # avoids pad, BOS, EOS and <image>
        ids[row, longest - n:] = [IMAGE_TOKEN] * Q + [2] + list(text)
        mask[row, longest - n:] = 1
    return ids, mask


@pytest.mark.parametrize("layout,dtype", LAYOUTS, ids=[f"{a}-{str(b)[6:]}" for a, b in LAYOUTS])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_stage_matches(checkpoint, name, layout, dtype):
    folder = checkpoint(name, layout, dtype)
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = image_batch(ours.config, 2, seed=1)
    ids, mask = prompts(ours.config, [3, 7], seed=2)
    with torch.no_grad():
        image_embeds = theirs.vision_model(torch.from_numpy(pixels)).last_hidden_state
        query_tokens = theirs.query_tokens.expand(2, -1, -1)
        query_output = theirs.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds).last_hidden_state
        projected = theirs.language_projection(query_output)
        logits = theirs(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                        attention_mask=torch.from_numpy(mask)).logits
    errors = {
        "vision": rel_error(ours.vision(pixels), image_embeds),
        "qformer": rel_error(ours.qformer(image_embeds.numpy()), query_output),
        "projection": rel_error(ours.project(query_output.numpy()), projected),
        # padded positions attend to nothing real and are undefined in both libraries
        "logits": rel_error(ours.forward(pixels, ids, mask)[mask == 1], logits[torch.from_numpy(mask == 1)]),
    }
    for stage, error in errors.items():
        LARGEST_ERRORS[stage] = max(error, LARGEST_ERRORS.get(stage, 0.0))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_ids_identical_batch_of_three(checkpoint, name):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels, ids, mask = batch_of_three(ours.config)
    with torch.no_grad():
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                   attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS, do_sample=False)
    got = ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS)
    assert got.shape == tuple(expected.shape)
    np.testing.assert_array_equal(got, expected.numpy())
    np.testing.assert_array_equal(ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS, use_cache=False), got)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_greedy_ids_identical_without_prompt(checkpoint, seed):
    folder = checkpoint("every-other-cross", "sharded", torch.bfloat16)
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = image_batch(ours.config, 2, seed=seed)
    with torch.no_grad():  # no max_new_tokens: both fall back to 20 new tokens
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels))
    np.testing.assert_array_equal(ours.generate(pixels), expected.numpy())


def test_greedy_ids_identical_with_position_interpolation(checkpoint):
    folder = checkpoint("small-patches")
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = image_batch(ours.config, 2, seed=8, scale=2)  # 56 x 60 px: a 14 x 15 grid instead of 7 x 7
    ids, mask = prompts(ours.config, [2, 5], seed=9)
    with torch.no_grad():
        expected_embeds = theirs.vision_model(torch.from_numpy(pixels), interpolate_pos_encoding=True)
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                   attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS,
                                   interpolate_pos_encoding=True)
    assert rel_error(ours.vision(pixels, interpolate_pos_encoding=True), expected_embeds.last_hidden_state) < TOL
    got = ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS, interpolate_pos_encoding=True)
    np.testing.assert_array_equal(got, expected.numpy())


def test_generation_stops_at_eos_and_pads(checkpoint):
    folder = checkpoint("every-other-cross")
    ours = miniblip2.load(folder)
    pixels = image_batch(ours.config, 3, seed=10)
    ids, mask = prompts(ours.config, [2, 2, 2], seed=11)
    free = ours.generate(pixels, ids, mask, max_new_tokens=6)
    stop_id = int(free[0, -4])  # make row 0's third new token the end-of-sequence id
    got = ours.generate(pixels, ids, mask, max_new_tokens=6, eos_token_id=[EOS_TOKEN, stop_id], pad_token_id=7)
    row = got[0, ids.shape[1]:]
    first_stop = int(np.argmax(np.isin(row, [EOS_TOKEN, stop_id])))
    assert np.all(row[first_stop + 1:] == 7)  # everything after a row's stop is padding
