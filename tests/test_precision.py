"""float16 and bfloat16 against transformers in the same dtype, on the CPU (torch runs
Blip2ForConditionalGeneration in both; NumPy has float16, and bfloat16 is emulated, see
miniblip2/precision.py). The same code runs on CuPy arrays on a GPU: tests/test_gpu.py.

Relative error = max|ours - reference| / max|reference|, as in test_parity.py. The tolerances
are a few units in the last place of the dtype, because two correct half-precision programs
differ by that much: a sum accumulated in another order rounds to the neighbouring half value,
and that difference travels on. Measured here (largest over the three tiny configurations):

    stage        float16   bfloat16   torch's own fp16 / bf16 distance from its fp32 model
    vision       1.9e-3    1.4e-2     1.4e-3 / 1.4e-2
    qformer      6.0e-7    1.1e-2     fp32 in fp16 (as transformers keeps it) / 1.1e-2
    projection   8.4e-4    4.4e-3     1.1e-3 / 1.0e-2
    logits       1.7e-3    1.3e-2     1.6e-3 / 1.8e-2

so ours is as close to torch's half model as torch's half model is to its own float32 one.
TOL_FP16 = 5e-3 is about 5 float16 ulps (2^-10 apart near the largest value), TOL_BF16 = 4e-2
about 5 bfloat16 ulps (2^-7); a real mistake (a missing scale, a layer norm in the wrong place,
a transposed weight) gives 1e-1 or more.
"""

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from test_parity import NEW_TOKENS, batch_of_three, image_batch, prompts, rel_error
from transformers import Blip2ForConditionalGeneration

import miniblip2
from miniblip2.checkpoint.safetensors import float32_to_bf16
from miniblip2.errors import CheckpointError
from miniblip2.nn import attention
from miniblip2.runtime.device import to_numpy
from miniblip2.runtime.precision import cast_weights, matmul, round_bf16, widen

TOL = {"float16": 5e-3, "bfloat16": 4e-2}
TOL_QFORMER_FP32 = 1e-4  # in float16 the Q-Former is float32: the parity bar
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reference(folder, dtype):
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=TORCH[dtype], attn_implementation="eager")
    return model.eval()


def as_numpy(tensor):  # a torch half tensor as the NumPy array miniblip2 takes for it
    return tensor.numpy() if tensor.dtype != torch.bfloat16 else tensor.float().numpy()


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_stage_matches_in_half(checkpoint, name, dtype):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype=dtype), reference(folder, dtype)
    pixels = image_batch(ours.config, 2, seed=1)
    ids, mask = prompts(ours.config, [3, 7], seed=2)
    with torch.no_grad():
        pixel_values = torch.from_numpy(pixels).to(TORCH[dtype])
        image_embeds = theirs.vision_model(pixel_values).last_hidden_state
        query_output = theirs.qformer(query_embeds=theirs.query_tokens.expand(2, -1, -1),
                                      encoder_hidden_states=image_embeds).last_hidden_state
        projected = theirs.language_projection(query_output.to(image_embeds.dtype))
        logits = theirs(pixel_values=pixel_values, input_ids=torch.from_numpy(ids),
                        attention_mask=torch.from_numpy(mask)).logits
    errors = {
        "vision": rel_error(ours.vision(pixels), image_embeds),
        "qformer": rel_error(ours.qformer(as_numpy(image_embeds)), query_output),
        "projection": rel_error(ours.project(as_numpy(query_output)), projected),
        "logits": rel_error(ours.forward(pixels, ids, mask)[mask == 1], logits[torch.from_numpy(mask == 1)]),
    }
    assert max(errors.values()) < TOL[dtype], errors
    if dtype == "float16":
        assert errors["qformer"] < TOL_QFORMER_FP32, errors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_ids_identical_in_float16(checkpoint, name):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype="float16"), reference(folder, "float16")
    pixels, ids, mask = batch_of_three(ours.config)
    with torch.no_grad():
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels).half(), input_ids=torch.from_numpy(ids),
                                   attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS), expected.numpy())


# bfloat16 keeps 8 bits: logits of about 3 are 1/64 apart, so torch's own top two logits are
# often exactly equal or one step apart, and then any correct bf16 program may pick the other
# one (a sweep of 54 rows x 30 tokens: 19 rows part, every one at a reference margin of 0 or
# 1 ulp). So: identical ids, except that a row may part where the reference's logit for its
# token beats ours by at most TOL_BF16 of the largest logit (2-3 ulps); after that the rows
# continue from different texts and are not compared.
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_ids_identical_in_bfloat16_up_to_ties(checkpoint, name):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype="bfloat16"), reference(folder, "bfloat16")
    pixels, ids, mask = batch_of_three(ours.config)
    pixel_values = torch.from_numpy(pixels).bfloat16()
    with torch.no_grad():
        expected = theirs.generate(pixel_values=pixel_values, input_ids=torch.from_numpy(ids),
                                   attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS,
                                   do_sample=False).numpy()
    got = ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS)
    assert got.shape == expected.shape
    for row in np.flatnonzero((got != expected).any(axis=1)):
        at = int(np.argmax(got[row] != expected[row]))  # the first new token where the row parts
        row_mask = np.concatenate([mask[row], np.ones(at - mask.shape[1], dtype=mask.dtype)])[None]
        with torch.no_grad():
            logits = theirs(pixel_values=pixel_values[row:row + 1], input_ids=torch.from_numpy(expected[row:row + 1, :at]),
                            attention_mask=torch.from_numpy(row_mask)).logits[0, -1].float().numpy()
        margin = logits[expected[row, at]] - logits[got[row, at]]
        assert margin <= TOL["bfloat16"] * np.abs(logits).max(), (row, at, margin)


def test_the_qformer_runs_in_float32_for_float16_only(checkpoint):
    folder = checkpoint()
    full, half, brain = (miniblip2.load(folder, dtype=d) for d in ("float32", "float16", "bfloat16"))
    assert half.weights["query_tokens"].dtype == np.float32
    assert half.weights["qformer"]["encoder"]["layer"][0]["attention"]["attention"]["query"]["weight"].dtype == np.float32
    assert half.weights["vision_model"]["post_layernorm"]["weight"].dtype == np.float16
    assert half.weights["language_projection"]["weight"].dtype == np.float16
    image_embeds = half.vision(image_batch(half.config, 2, seed=5))
    assert image_embeds.dtype == np.float16
    query_output = half.qformer(image_embeds)
    # fp16 image embeddings cast up, then the very float32 computation of the float32 model
    np.testing.assert_array_equal(to_numpy(query_output), to_numpy(full.qformer(image_embeds.astype(np.float32))))
    assert half.project(query_output).dtype == np.float16
    # transformers applies _keep_in_fp32_modules to float16 only: in bfloat16 the Q-Former is bf16
    assert brain.weights["query_tokens"].dtype == np.uint16
    assert brain.weights["vision_model"]["post_layernorm"]["weight"].nbytes == full.weights["vision_model"][
        "post_layernorm"]["weight"].nbytes // 2


def test_no_nan_or_inf_on_a_long_left_padded_prompt_in_float16(checkpoint):
    folder = checkpoint()
    ours = miniblip2.load(folder, dtype="float16")
    longest = ours.config.text.max_position_embeddings - ours.config.num_query_tokens - 1 - 20
    ids, mask = prompts(ours.config, [1, longest // 2, longest], seed=6)  # up to 70 tokens of left padding
    pixels = image_batch(ours.config, 3, seed=7)
    logits = ours.forward(pixels, ids, mask)
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
    with torch.no_grad():
        expected = reference(folder, "float16")(pixel_values=torch.from_numpy(pixels).half(), input_ids=torch.from_numpy(ids),
                                                attention_mask=torch.from_numpy(mask)).logits
    assert rel_error(logits[mask == 1], expected[torch.from_numpy(mask == 1)]) < TOL["float16"]
    assert ours.generate(pixels, ids, mask, max_new_tokens=20).shape == (3, ids.shape[1] + 20)


# A padding position sees no key at all. In float16 a score plus the mask's -65504 rounds to
# -inf once the score is below about -16; a row of only -inf would be NaN, and a NaN value row
# poisons every query at the next layer (probability 0 times NaN is NaN).
def test_a_fully_masked_row_stays_finite_in_float16():
    q = np.full((1, 1, 2, 4), 8, np.float16)
    k = -np.ones((1, 1, 3, 4), np.float16)  # scores of -256 * 0.5: far below -16
    v = np.ones((1, 1, 3, 4), np.float16)
    mask = np.array([[[[-65504, -65504, -65504], [0, -65504, -65504]]]], np.float16)
    out, probs = attention(q, k, v, scale=0.5, mask=mask)
    assert out.dtype == np.float16 and np.isfinite(out).all() and np.isfinite(probs).all()
    np.testing.assert_allclose(probs[0, 0, 1], [1, 0, 0])


def test_round_bf16_is_torch_rounding():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0, -0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.3895314e38, 3.4e38, np.inf, -np.inf,
                                  1e-40, np.nan], np.float32)]).astype(np.float32)  # ties, overflow, subnormal
    expected = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(round_bf16(x), expected)
    np.testing.assert_array_equal(widen(float32_to_bf16(x)), expected)


# One bf16 product through miniblip2's emulation and through torch's bf16 GEMM (fp32
# accumulation): equal up to the order of the sums, one bf16 ulp at most.
def test_bf16_matmul_is_a_bf16_gemm_with_float32_accumulation():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((16, 300), np.float32), rng.standard_normal((24, 300), np.float32)
    expected = (torch.from_numpy(a).bfloat16() @ torch.from_numpy(b).bfloat16().T).float().numpy()
    got = matmul(a, float32_to_bf16(b).T)
    np.testing.assert_allclose(got, expected, rtol=2 ** -7, atol=0)
    half = matmul(a.astype(np.float16), b.astype(np.float16).T)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, (torch.from_numpy(a).half() @ torch.from_numpy(b).half().T).numpy(), rtol=2 ** -10)


def test_float16_overflow_is_refused():
    with pytest.raises(CheckpointError, match="'big'.*float16 range.*1e\\+05.*float32"):
        cast_weights({"big": np.array([1e5], np.float32)}, "float16")
    assert cast_weights({"qformer.x": np.array([1e5], np.float32)}, "float16", ("qformer.",))["qformer.x"].dtype == np.float32
