"""On an NVIDIA GPU: miniblip2 on CuPy against transformers on PyTorch CUDA, same GPU.

    pip install -e '.[gpu,test]'   # CuPy for CUDA 12.x; torch must be a CUDA build for the reference
    python -m pytest -m gpu -v     # these tests: skipped, with the reason, where there is no GPU
    MINIBLIP2_TEST_DEVICE=cuda python -m pytest   # and the whole suite with the models on the GPU

- float32: every stage within 1e-4 relative (the parity bar), greedy and beam ids identical.
- float16 and bfloat16: every stage within the tolerances of test_precision.py (a few ulps of
  the dtype, the same as on the CPU); float16 greedy ids identical, bfloat16 identical up to
  ties in the reference's own bf16 logits (see test_precision.py).
- random weights at the real blip2-opt-2.7b shapes (layers cut): the logits of the first
  generated step in float16 within REAL_SHAPES_TOL of PyTorch's.
- a decoding step launches its kernels without a single device synchronisation.
"""

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from test_parity import NEW_TOKENS, batch_of_three, image_batch, prompts, rel_error
from test_precision import TOL, TORCH, as_numpy
from test_precision import reference as cpu_reference

import miniblip2
from miniblip2.errors import DeviceError
from miniblip2.runtime.device import array_module, to_numpy


def gpu_missing():
    """Why these tests cannot run here, or None."""
    try:
        array_module("cuda")
    except DeviceError as err:
        return str(err).split(": install")[0]
    if not torch.cuda.is_available():
        return "torch has no CUDA here: the reference needs a CUDA build of torch"
    return None


REASON = gpu_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"no GPU: {REASON}")]
FP32_TOL = 1e-4
# Random weights, real widths (2560-wide fp16 sums), 4 layers per tower. Measured on the CPU with
# 2 layers (NumPy fp16 vs torch CPU fp16): 1.3e-3, where torch's own fp16 is 8.7e-4 from its fp32;
# 5e-3 is about 5 float16 ulps near the largest logit.
REAL_SHAPES_TOL = 5e-3
REAL_SHAPES_LAYERS = 4


def reference(folder, dtype):
    return cpu_reference(folder, dtype).to("cuda")


def cuda(array, dtype):
    return torch.from_numpy(array).to("cuda", TORCH[dtype])


@pytest.fixture(autouse=True)
def no_tf32():
    """PyTorch's float32 matmuls in full float32, as CuPy's (no TF32 unless CUPY_TF32=1)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def stage_errors(ours, theirs, dtype, pixels, ids, mask):
    with torch.no_grad():
        pixel_values = cuda(pixels, dtype)
        image_embeds = theirs.vision_model(pixel_values).last_hidden_state
        query_output = theirs.qformer(query_embeds=theirs.query_tokens.expand(len(pixels), -1, -1),
                                      encoder_hidden_states=image_embeds).last_hidden_state
        projected = theirs.language_projection(query_output.to(image_embeds.dtype))
        logits = theirs(pixel_values=pixel_values, input_ids=torch.from_numpy(ids).cuda(),
                        attention_mask=torch.from_numpy(mask).cuda()).logits
    real = torch.from_numpy(mask == 1).to("cuda")
    return {
        "vision": rel_error(ours.vision(pixels), image_embeds),
        "qformer": rel_error(ours.qformer(as_numpy(image_embeds.cpu())), query_output),
        "projection": rel_error(ours.project(as_numpy(query_output.cpu())), projected),
        "logits": rel_error(ours.forward(pixels, ids, mask)[mask == 1], logits[real]),
    }


def torch_generate(theirs, dtype, pixels, ids, mask, **kwargs):
    with torch.no_grad():
        return theirs.generate(pixel_values=cuda(pixels, dtype), input_ids=torch.from_numpy(ids).cuda(),
                               attention_mask=torch.from_numpy(mask).cuda(), **kwargs).cpu().numpy()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_stage_matches_torch_cuda(checkpoint, name, dtype):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype=dtype, device="cuda"), reference(folder, dtype)
    assert type(ours.weights["query_tokens"]).__module__.startswith("cupy")
    pixels = image_batch(ours.config, 2, seed=1)
    ids, mask = prompts(ours.config, [3, 7], seed=2)
    errors = stage_errors(ours, theirs, dtype, pixels, ids, mask)
    assert max(errors.values()) < (FP32_TOL if dtype == "float32" else TOL[dtype]), errors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_greedy_and_beam_ids_identical(checkpoint, name):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder, device="cuda"), reference(folder, "float32")
    pixels, ids, mask = batch_of_three(ours.config)
    for kwargs in [dict(do_sample=False), dict(num_beams=3, length_penalty=0.5),
                   dict(num_beams=4, num_return_sequences=2, no_repeat_ngram_size=2, repetition_penalty=1.2)]:
        expected = torch_generate(theirs, "float32", pixels, ids, mask, max_new_tokens=NEW_TOKENS, **kwargs)
        np.testing.assert_array_equal(ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS, **kwargs), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float16_greedy_ids_identical(checkpoint, name):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype="float16", device="cuda"), reference(folder, "float16")
    pixels, ids, mask = batch_of_three(ours.config)
    expected = torch_generate(theirs, "float16", pixels, ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_greedy_ids_identical_up_to_ties(checkpoint, name):
    folder = checkpoint(name)
    ours, theirs = miniblip2.load(folder, dtype="bfloat16", device="cuda"), reference(folder, "bfloat16")
    pixels, ids, mask = batch_of_three(ours.config)
    expected = torch_generate(theirs, "bfloat16", pixels, ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = ours.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS)
    assert got.shape == expected.shape
    for row in np.flatnonzero((got != expected).any(axis=1)):
        at = int(np.argmax(got[row] != expected[row]))
        row_mask = np.concatenate([mask[row], np.ones(at - mask.shape[1], dtype=mask.dtype)])[None]
        with torch.no_grad():
            logits = theirs(pixel_values=cuda(pixels[row:row + 1], "bfloat16"),
                            input_ids=torch.from_numpy(expected[row:row + 1, :at]).cuda(),
                            attention_mask=torch.from_numpy(row_mask).cuda()).logits[0, -1].float().cpu().numpy()
        margin = logits[expected[row, at]] - logits[got[row, at]]
        assert margin <= TOL["bfloat16"] * np.abs(logits).max(), (row, at, margin)


@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory):
    """A random checkpoint with blip2-opt-2.7b's config and shapes, 4 layers per tower, fp16."""
    from miniblip2.testing.random_checkpoint import write_random_checkpoint
    return write_random_checkpoint(tmp_path_factory.mktemp("blip2-opt-2.7b-random"), "blip2-opt-2.7b",
                                   layers=REAL_SHAPES_LAYERS, dtype=np.float16)


def test_real_shapes_first_step_logits_in_float16(real_shapes):
    ours, theirs = miniblip2.load(real_shapes, dtype="float16", device="cuda"), reference(real_shapes, "float16")
    config = ours.config
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    ids = np.array([[config.image_token_index] * 32 + [2] + list(rng.integers(100, 50000, 12))] * 2)
    mask = np.ones_like(ids)
    with torch.no_grad():
        expected = theirs(pixel_values=cuda(pixels, "float16"), input_ids=torch.from_numpy(ids).cuda(),
                          attention_mask=torch.from_numpy(mask).cuda()).logits[:, -1]
    got = ours.forward(pixels, ids, mask)[:, -1]
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert rel_error(got, expected) < REAL_SHAPES_TOL
    np.testing.assert_array_equal(got.astype(np.float32).argmax(-1), expected.float().argmax(-1).cpu().numpy())


# A decoding step (the decoder with its KV cache, the logits processors, the choice of the token)
# must never wait for the GPU: the only wait per token is the copy of the chosen ids after it.
# The GPU is kept busy for about a second by a spinning kernel queued first; if anything in the
# step synchronised, the CPU would return from the step only after the spin, and the stream
# would be done. Two steps run first, so kernels are compiled and memory pooled.
SPIN = r'''extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}'''


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_decoding_step_never_waits_for_the_gpu(checkpoint, dtype):
    import cupy

    from miniblip2.generation.processors import greedy_choice, process_logits
    ours = miniblip2.load(checkpoint(), dtype=dtype, device="cuda")
    pixels = image_batch(ours.config, 2, seed=5)
    ids, mask = prompts(ours.config, [2, 5], seed=6)
    decoder, gen, _ = ours._prepare_generation(pixels, ids, mask, None, None, True, False,
                                               dict(max_new_tokens=5, repetition_penalty=1.2, no_repeat_ngram_size=2))
    xp, input_ids = ours.xp, decoder.prompt_ids
    spin = cupy.RawKernel(SPIN, "spin")
    logits, state = decoder.start()
    for step in range(4):
        if step == 3:
            spin((1,), (1,), (np.int64(2_000_000_000),))  # about a second at 2 GHz
        next_ids = greedy_choice(process_logits(input_ids, logits, gen, ids.shape[1], None))
        input_ids = xp.concat([input_ids, next_ids[:, None]], axis=1)
        logits, state = decoder.step(next_ids, state)
        if step == 3:
            assert not cupy.cuda.get_current_stream().done, "the step waited for the GPU"
        to_numpy(next_ids)
