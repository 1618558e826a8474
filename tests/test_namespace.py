"""The model math must reach NumPy only through its array namespace (`xp = namespace(x)`), so
that the same code runs on CuPy arrays on a GPU. Checked without a GPU: the weights and inputs
become `StrictArray`s (tests/strict_numpy.py), on which a direct `np.*` call raises. Results
must equal the plain NumPy run bit for bit (same operations, same order)."""

import numpy as np
import pytest

import miniblip2
from miniblip2.model import Blip2
from strict_numpy import DirectNumPyCall, StrictArray, strict, to_strict
from test_parity import image_batch, prompts


@pytest.fixture(scope="module")
def pair(checkpoint):
    plain = miniblip2.load(checkpoint())
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
