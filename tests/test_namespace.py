"""The model math must reach NumPy only through its array namespace (`xp = namespace(x)`), so
that the same code runs on CuPy arrays on a GPU. Checked without a GPU: the weights and inputs
become `StrictArray`s (tests/strict_numpy.py), on which a direct `np.*` call raises. Results
must equal the plain NumPy run bit for bit (same operations, same order), in every dtype.

And a step of generation must not copy to the host more than once (the chosen ids, or whether to
stop): on a pretend device (`DeviceArray`) every get(), bool(), int(), float() is counted."""

import re
from pathlib import Path

import numpy as np
import pytest
from strict_numpy import DeviceArray, DirectNumPyCall, StrictArray, strict, to_strict
from test_parity import image_batch, prompts

import miniblip2
from miniblip2.blip2 import Blip2

MODEL_CODE = ["nn.py", "runtime/precision.py", "vision.py", "bert.py", "qformer.py", "opt.py", "t5.py",
              "generation/loops.py", "generation/processors.py", "blip2.py", "blip2_retrieval.py", "retrieval.py",
              "glue.py", "blip.py", "blip_retrieval.py"]  # BLIP's run on StrictArrays in test_blip*.py


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def pair(checkpoint, request):
    plain = miniblip2.load(checkpoint(), dtype=request.param, device="cpu")
    return plain, Blip2(plain.config, to_strict(plain.weights), plain.processor)


def test_the_checker_catches_a_direct_numpy_call():
    x = np.ones(3, np.float32).view(StrictArray)
    assert float(strict.exp(x)[0]) == pytest.approx(np.e)
    assert (x + x * 2 @ x) is not None  # operators are allowed
    with pytest.raises(DirectNumPyCall, match="np.exp"):
        np.exp(x)
    with pytest.raises(DirectNumPyCall, match="np.where"):
        np.where(x > 0, x, 0)


def test_stages_run_through_the_namespace(pair):
    plain, checked = pair
    pixels = image_batch(plain.config, 2, seed=1)
    image_embeds = checked.vision(pixels.view(StrictArray))
    assert isinstance(image_embeds, StrictArray)
    np.testing.assert_array_equal(np.asarray(image_embeds), plain.vision(pixels))
    np.testing.assert_array_equal(np.asarray(checked.project(checked.qformer(image_embeds))),
                                  plain.project(plain.qformer(np.asarray(image_embeds))))


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2},
                                    {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.7, "seed": 0}],
                         ids=["greedy", "beams", "sampling"])
def test_forward_and_generation_run_through_the_namespace(pair, kwargs):
    plain, checked = pair
    pixels = image_batch(plain.config, 2, seed=2)
    ids, mask = prompts(plain.config, [2, 5], seed=3)
    np.testing.assert_array_equal(checked.forward(pixels.view(StrictArray), ids, mask), plain.forward(pixels, ids, mask))
    np.testing.assert_array_equal(checked.generate(pixels.view(StrictArray), ids, mask, max_new_tokens=8, **kwargs),
                                  plain.generate(pixels, ids, mask, max_new_tokens=8, **kwargs))


# np.asarray(x) on a CuPy array raises, and StrictArray cannot catch it (NumPy does not dispatch
# asarray): model code converts with device.to_numpy, and builds host arrays without asarray.
def test_model_code_converts_to_numpy_only_through_to_numpy():
    folder = Path(miniblip2.__file__).parent
    for name in MODEL_CODE:
        calls = re.findall(r"np\.(?:asarray|array|ascontiguousarray)\(", (folder / name).read_text())
        assert not calls, f"{name}: {calls}: use device.to_numpy(x)"


@pytest.fixture(scope="module")
def on_device(checkpoint):
    plain = miniblip2.load(checkpoint(), device="cpu")
    return plain, Blip2(plain.config, to_strict(plain.weights, DeviceArray), plain.processor)


def host_transfers(run):
    DeviceArray.host_transfers[0] = 0
    result = run()
    return result, DeviceArray.host_transfers[0]


# Every token is forced (min_new_tokens), so each loop runs exactly N steps. Besides one transfer
# per step, generate copies the prompt ids once (greedy, sampling) or, after a beam search, the
# longest length and the result.
@pytest.mark.parametrize("kwargs,outside_the_loop", [({}, 1), ({"num_beams": 3, "no_repeat_ngram_size": 2}, 2),
                                                     ({"do_sample": True, "top_p": 0.9, "seed": 0}, 1)],
                         ids=["greedy", "beams", "sampling"])
def test_one_host_transfer_per_generated_token(on_device, kwargs, outside_the_loop):
    plain, device = on_device
    N = 8
    pixels = image_batch(plain.config, 2, seed=4)
    ids, mask = prompts(plain.config, [2, 5], seed=5)
    generate = lambda model: model.generate(pixels, ids, mask, max_new_tokens=N, min_new_tokens=N, **kwargs)
    got, transfers = host_transfers(lambda: generate(device))
    assert transfers == N + outside_the_loop
    if "do_sample" in kwargs:  # the noise comes from the device's generator: reproducible there
        np.testing.assert_array_equal(generate(device), got)
    else:
        np.testing.assert_array_equal(got, generate(plain))
    logits, transfers = host_transfers(lambda: device.forward(pixels, ids, mask))
    assert transfers == 1 and type(logits) is np.ndarray


# BLIP-2 with Flan-T5 through the same check: T5's encoder, decoder and decoding state run on
# StrictArrays and give the plain run's numbers bit for bit (float32 and bfloat16; float16 is
# refused for T5).
@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def t5_pair(t5_checkpoint, request):
    plain = miniblip2.load(t5_checkpoint(), dtype=request.param, device="cpu")
    return plain, Blip2(plain.config, to_strict(plain.weights), plain.processor)


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2},
                                    {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.7, "seed": 0}],
                         ids=["greedy", "beams", "sampling"])
def test_t5_forward_and_generation_run_through_the_namespace(t5_pair, kwargs):
    from test_flan_t5 import t5_prompts
    plain, checked = t5_pair
    pixels = image_batch(plain.config, 2, seed=2)
    ids, mask = t5_prompts(plain.config, [2, 5], seed=3)
    decoder_ids = np.array([[0, 4, 9], [0, 7, 7]])
    np.testing.assert_array_equal(checked.forward(pixels.view(StrictArray), ids, mask, decoder_input_ids=decoder_ids),
                                  plain.forward(pixels, ids, mask, decoder_input_ids=decoder_ids))
    np.testing.assert_array_equal(checked.generate(pixels.view(StrictArray), ids, mask, max_new_tokens=6, **kwargs),
                                  plain.generate(pixels, ids, mask, max_new_tokens=6, **kwargs))
