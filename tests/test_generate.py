"""Every generation strategy and control against transformers' `generate` and its logits processors.

Deterministic strategies (greedy, beam search, and sampling restricted to one token) must give
identical ids to `Blip2ForConditionalGeneration.generate` with the same arguments, on tiny random
checkpoints, for batches with prompts of different lengths (left padding). Sampling proper cannot
match torch's random stream, so it is checked for reproducibility and, statistically, for
drawing from the right distribution. Each processor and warper is compared with the
transformers class of the same name on random logits. Streaming must rebuild `caption`'s text.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from test_parity import image_batch, prompts, reference
from tiny import VOCAB_SIZE
from transformers import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import miniblip2
from miniblip2 import PromptError, TextStreamer, chat_prompt
from miniblip2.generation import processors as sampling
from miniblip2.generation.settings import GenerationConfig

LENGTHS = [1, 4, 9, 2]  # prompt text lengths of the (up to) four inputs: left padding in every batch
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def models(checkpoint):
    folder = checkpoint("every-other-cross")
    return miniblip2.load(folder, progress=False), reference(folder)


@pytest.fixture(scope="module")
def batch(models):
    ours = models[0]
    ids, mask = prompts(ours.config, LENGTHS, seed=4)
    return image_batch(ours.config, len(LENGTHS), seed=3), ids, mask


@pytest.fixture(scope="module")
def frequent(models, batch):
    """The two tokens greedy search emits most: as EOS ids they end beams at different steps
    (the real EOS, id 10, is rare in a random model and would leave the EOS code untested)."""
    pixels, ids, mask = batch
    new = models[0].generate(pixels, ids, mask, max_new_tokens=20)[:, ids.shape[1]:]
    values, counts = np.unique(new, return_counts=True)
    return [int(v) for v in values[np.argsort(-counts, kind="stable")[:2]]]


def both(models, batch, rows=len(LENGTHS), **kwargs):
    """(ours, transformers') ids for the first `rows` inputs of `batch`, same arguments."""
    pixels, ids, mask = (a[:rows] for a in batch)
    drop = ids.shape[1] - int(mask.sum(axis=1).max())  # columns that are padding in every row
    ids, mask = ids[:, drop:], mask[:, drop:]
    with torch.no_grad():
        expected = models[1].generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                      attention_mask=torch.from_numpy(mask), **kwargs).numpy()
    return models[0].generate(pixels, ids, mask, **kwargs), expected


def assert_same(got, expected):
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def first_stop(rows, stop_ids, T):
    """New tokens until the first stop id in each row (the row's length if none)."""
    new = rows[:, T:]
    hit = np.isin(new, stop_ids)
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, new.shape[1])


# --- greedy and beam search: identical ids -------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_greedy_matches_transformers_for_each_batch_size(models, batch, frequent, rows):
    assert_same(*both(models, batch, rows, max_new_tokens=NEW_TOKENS, eos_token_id=frequent))


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 2.0])
@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_beam_search_matches_transformers(models, batch, frequent, num_beams, length_penalty, early_stopping):
    got, expected = both(models, batch, max_new_tokens=NEW_TOKENS, num_beams=num_beams, num_return_sequences=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=frequent)
    assert_same(got, expected)
    assert got.shape[0] == len(LENGTHS) * num_beams  # each input's beams together, best first


def test_beams_finish_at_different_steps(models, batch, frequent):
    """The grid above exercises EOS handling: hypotheses end at many different steps, and with a
    length bonus some run to the limit."""
    T = batch[1].shape[1]
    got, expected = both(models, batch, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=3,
                         eos_token_id=frequent, length_penalty=0.0)
    assert_same(got, expected)
    assert len(set(first_stop(got, frequent, T).tolist())) >= 4
    got, expected = both(models, batch, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=3,
                         eos_token_id=frequent, early_stopping="never", length_penalty=2.0)
    assert_same(got, expected)
    assert first_stop(got, frequent, T).max() == NEW_TOKENS


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("eos", ["default", "one", "two"])
def test_beam_search_batch_sizes_and_eos_ids(models, batch, frequent, rows, eos):
    eos_token_id = {"default": None, "one": frequent[0], "two": frequent}[eos]
    assert_same(*both(models, batch, rows, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2,
                      eos_token_id=eos_token_id))


CONTROLS = [
    dict(repetition_penalty=1.5), dict(repetition_penalty=0.7), dict(no_repeat_ngram_size=1),
    dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3), dict(min_new_tokens=6), dict(min_length=22),
    dict(max_length=24), dict(pad_token_id=0), dict(pad_token_id=7),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=3),
]


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("controls", CONTROLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_logits_controls_match_transformers(models, batch, frequent, controls, num_beams):
    lengths = {} if "max_length" in controls else dict(max_new_tokens=NEW_TOKENS)
    assert_same(*both(models, batch, num_beams=num_beams, eos_token_id=frequent, **lengths, **controls))


def test_beam_search_without_cache_and_defaults(models, batch, frequent):
    pixels, ids, mask = batch
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=3, eos_token_id=frequent, no_repeat_ngram_size=2)
    np.testing.assert_array_equal(models[0].generate(pixels, ids, mask, use_cache=False, **kwargs),
                                  models[0].generate(pixels, ids, mask, **kwargs))
    assert_same(*both(models, batch, num_beams=2))  # no length given: 20 new tokens, EOS from the config


# --- sampling -------------------------------------------------------------------------------------

def test_sampling_is_reproducible_from_a_seed_or_generator(models, batch):
    pixels, ids, mask = batch
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.3, top_k=40, top_p=0.95)
    first = models[0].generate(pixels, ids, mask, seed=7, **kwargs)
    assert first.shape == (len(LENGTHS), ids.shape[1] + NEW_TOKENS)
    np.testing.assert_array_equal(models[0].generate(pixels, ids, mask, seed=7, **kwargs), first)
    same_stream = np.random.default_rng(7)
    np.testing.assert_array_equal(models[0].generate(pixels, ids, mask, generator=same_stream, **kwargs), first)
    assert not np.array_equal(models[0].generate(pixels, ids, mask, seed=8, **kwargs), first)
    greedy = models[0].generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS)
    assert not np.array_equal(first, greedy)  # temperature 1.3 over 40 tokens: sampling did sample


ONE_TOKEN_LEFT = [dict(top_k=1), dict(top_k=1, temperature=0.5, repetition_penalty=1.3), dict(top_p=1e-6, top_k=0),
                  dict(top_p=1e-6, temperature=2.0, no_repeat_ngram_size=2)]


@pytest.mark.parametrize("kwargs", ONE_TOKEN_LEFT)
def test_sampling_restricted_to_one_token_matches_transformers(models, batch, frequent, kwargs):
    """top_k=1 (or a top_p that keeps only the best token) leaves one token to draw: the sampling
    path, warpers included, must then give transformers' ids exactly, and greedy's."""
    got, expected = both(models, batch, max_new_tokens=NEW_TOKENS, do_sample=True, eos_token_id=frequent, **kwargs)
    assert_same(got, expected)
    greedy = {k: v for k, v in kwargs.items() if k in ("repetition_penalty", "no_repeat_ngram_size")}
    assert_same(got, both(models, batch, max_new_tokens=NEW_TOKENS, eos_token_id=frequent, **greedy)[1])


def test_num_return_sequences_for_samples_and_beam_sampling(models, batch, frequent):
    pixels, ids, mask = batch
    samples = models[0].generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS, do_sample=True,
                                 num_return_sequences=3, seed=1)
    assert samples.shape == (3 * len(LENGTHS), ids.shape[1] + NEW_TOKENS)
    np.testing.assert_array_equal(samples[::3, :ids.shape[1]], ids)  # input i's samples are rows 3i..3i+2
    assert len({row.tobytes() for row in samples[:3]}) > 1
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, num_beams=3, num_return_sequences=2, eos_token_id=frequent)
    beams = models[0].generate(pixels, ids, mask, seed=2, **kwargs)
    np.testing.assert_array_equal(models[0].generate(pixels, ids, mask, seed=2, **kwargs), beams)
    with torch.no_grad():  # torch's draws differ, but the layout must not
        theirs = models[1].generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                    attention_mask=torch.from_numpy(mask), **kwargs)
    assert beams.shape[0] == theirs.shape[0] == 2 * len(LENGTHS)


# Draws from fixed logits must follow the filtered softmax. N = 200,000 draws; a category of
# probability p is counted N p +- sqrt(N p (1 - p)) times, and a count more than 6 standard
# deviations off happens with probability 2e-9 per category: a correct sampler fails for fewer
# than 1 seed in 10^7, and the fixed seed makes the test deterministic. A wrong distribution fails: the asserts
# at the end show that the unfiltered softmax, and a top-p that keeps one token too many, would.
DRAWS = 200_000


def within_six_sigma(counts, probs):
    expected = DRAWS * probs
    return bool(np.all(np.abs(counts - expected) <= 6 * np.sqrt(expected * (1 - probs)) + 1e-9))


def test_sampled_frequencies_follow_the_filtered_softmax():
    logits = np.array([[2.0, 1.5, 1.2, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -2.0]], np.float32)
    gen = GenerationConfig(max_new_tokens=1, do_sample=True, temperature=0.8, top_k=7, top_p=0.9, eos_token_ids=(9,))
    scores = sampling.process_logits(np.zeros((1, 3), np.int64), logits, gen, 3, None)  # [1, V]
    probs = sampling.softmax(scores.astype(np.float64))[0]
    assert np.count_nonzero(probs) == 5  # top-k keeps 7, top-p then drops 2 more
    draws = sampling.sample_choice(np.repeat(scores, DRAWS, axis=0), np.random.default_rng(0))
    counts = np.bincount(draws, minlength=len(probs))
    assert counts[probs == 0].sum() == 0  # a filtered token is never drawn
    assert within_six_sigma(counts, probs)
    unfiltered = sampling.softmax(logits[0].astype(np.float64) / 0.8)
    one_more = sampling.softmax(np.where(np.arange(10) < 6, logits[0] / 0.8, -np.inf).astype(np.float64))
    assert not within_six_sigma(counts, unfiltered) and not within_six_sigma(counts, one_more)


def test_beam_sampling_draws_without_replacement_from_the_softmax():
    scores = np.array([[np.log(0.4), np.log(0.3), np.log(0.2), np.log(0.1), -np.inf]])  # token 4 filtered
    drawn = sampling.sample_without_replacement(np.repeat(scores, DRAWS, axis=0), 3, np.random.default_rng(1))
    assert all(len(set(row)) == 3 for row in drawn[:1000]) and not np.any(drawn == 4)
    probs = np.exp(scores[0])
    assert within_six_sigma(np.bincount(drawn[:, 0], minlength=5), probs)  # the first draw: plain softmax
    # the second draw, given the first was token 0: softmax over what is left
    second = drawn[drawn[:, 0] == 0, 1]
    left = np.array([0, 0.3, 0.2, 0.1, 0]) / 0.6
    expected = len(second) * left
    assert np.all(np.abs(np.bincount(second, minlength=5) - expected) <= 6 * np.sqrt(expected * (1 - left)) + 1e-9)


# --- each processor and warper against the transformers class of the same name ------------------
# Random logits [6, 50] (and ids drawn from a small alphabet so that tokens and n-grams repeat).
# Tolerance: exact equality. Every processor selects or masks tokens and scales with one float32
# operation by the same float32 constant as torch (x / t, x * p), which rounds identically; top-p
# sums a softmax whose last bit may differ from torch's (different exp), which could flip a token
# only if its cumulative mass were within ~1e-7 (relative) of the cut: the test checks that none
# is within 1e-5.

def random_case(seed, rows=6, vocab=50, length=11, alphabet=8):
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    ids = rng.integers(0, alphabet, size=(rows, length))
    return ids, scores


def reference_scores(processor, ids, scores):
    return processor(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processors_equal_transformers(seed):
    ids, scores = random_case(seed)
    ignore = np.array([0, 3, 0, 5, 11, 1])  # left-padding lengths per row, as generate passes them
    for penalty in (1.3, 0.6):
        np.testing.assert_array_equal(sampling.repetition_penalty(ids, scores, penalty),
                                      reference_scores(RepetitionPenaltyLogitsProcessor(penalty), ids, scores))
        np.testing.assert_array_equal(
            sampling.repetition_penalty(ids, scores, penalty, ignore),
            reference_scores(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.from_numpy(ignore)),
                             ids, scores))
    for n in (1, 2, 3, 4, 12):
        np.testing.assert_array_equal(sampling.no_repeat_ngram(ids, scores, n),
                                      reference_scores(NoRepeatNGramLogitsProcessor(n), ids, scores))
    for eos in ([3], [3, 7]):
        for length in (5, 11, 12):
            np.testing.assert_array_equal(sampling.min_length(ids, scores, length, eos),
                                          reference_scores(MinLengthLogitsProcessor(length, eos), ids, scores))
        for prompt, new in ((4, 6), (4, 7), (9, 1)):
            np.testing.assert_array_equal(
                sampling.min_new_tokens(ids, scores, prompt, new, eos),
                reference_scores(MinNewTokensLengthLogitsProcessor(prompt, new, eos), ids, scores))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warpers_equal_transformers(seed):
    ids, scores = random_case(seed)
    for t in (0.3, 0.7, 1.7):
        np.testing.assert_array_equal(sampling.temperature(scores, t),
                                      reference_scores(TemperatureLogitsWarper(t), ids, scores))
    for k, keep in ((1, 1), (5, 1), (5, 8), (50, 1), (80, 1)):
        np.testing.assert_array_equal(sampling.top_k(scores, k, keep),
                                      reference_scores(TopKLogitsWarper(k, min_tokens_to_keep=keep), ids, scores))
    ascending = np.sort(scores.astype(np.float64), axis=1)
    mass_below = np.cumsum(sampling.softmax(ascending), axis=1)
    for p, keep in ((0.05, 1), (0.5, 1), (0.9, 1), (0.9, 3), (0.999, 1), (1.0, 1)):
        assert p == 1.0 or (np.abs(mass_below - (1 - p)) / (1 - p)).min() > 1e-5  # no token sits on the cut
        np.testing.assert_array_equal(sampling.top_p(scores, p, keep),
                                      reference_scores(TopPLogitsWarper(p, min_tokens_to_keep=keep), ids, scores))


# --- streaming ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def talker(talking_checkpoint):
    return miniblip2.load(talking_checkpoint, progress=False)


def image(seed):
    return np.random.default_rng(seed).integers(0, 256, size=(30, 30, 3), dtype=np.uint8)


def test_stream_pieces_join_to_the_caption(talker):
    cases = [dict(), dict(prompt="Question: what is this? Answer:"), dict(do_sample=True, seed=3),
             dict(do_sample=True, seed=4, top_p=0.8, prompt="a photo of"),
             dict(max_new_tokens=40, repetition_penalty=1.2)]
    replaced = 0
    for i, kwargs in enumerate(cases):
        pieces = list(talker.stream(image(i), **kwargs))
        text = talker.caption(image(i), **kwargs)
        assert "".join(pieces) == text and len(pieces) > 1
        assert all(piece and "\ufffd" not in piece[-1:] for piece in pieces[:-1])  # held until complete
        replaced += "\ufffd" in text
    assert replaced  # random byte tokens make broken UTF-8 too; it still streams to the same text


def test_generate_with_a_streamer_callback(talker):
    pieces = []
    streamer = TextStreamer(talker.processor.tokenizer, on_text=pieces.append)
    text = talker.caption(image(9), prompt="a photo of", streamer=streamer)
    assert "".join(pieces) == text and len(pieces) > 1


def test_streamer_never_splits_a_character(talker):
    """One fixed id sequence where "é" is 2 byte-level tokens and the emoji 4: no piece may show
    half a character, and the pieces must make the stripped text."""
    tokenizer = talker.processor.tokenizer
    text = "  a café 😀 ok  \n"
    ids = tokenizer.encode(text)[1:]  # without BOS
    halves = [i for i in range(len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert len(halves) >= 1 + 3  # "é" is cut once, the emoji three times
    streamer, pieces = TextStreamer(tokenizer), []
    streamer.put(np.array([[2]]))  # the prompt, skipped
    for token in ids:
        pieces.append(streamer.put(np.array([token])))
        assert "\ufffd" not in pieces[-1]
    pieces.append(streamer.end())
    assert "".join(pieces) == "a café 😀 ok" == text.strip()
    assert pieces.count("") >= 4 + 3  # the half characters and the held-back spaces waited


# --- chat prompts ---------------------------------------------------------------------------------

def test_chat_prompt_is_the_lavis_format():
    turns = [("which city is this?", "singapore"), ("why?", "it has a statue of a merlion")]
    expected = ("Question: which city is this? Answer: singapore. Question: why? Answer: it has a statue of a "
                "merlion. Question: where is the name merlion coming from? Answer:")
    assert chat_prompt(turns, "where is the name merlion coming from?") == expected
    assert chat_prompt([], "what is this?") == "Question: what is this? Answer:"
    for bad in [([("q",)], "x"), ([("q", 1)], "x"), ([], None), (5, "x")]:
        with pytest.raises(PromptError):
            chat_prompt(*bad)


def test_caption_with_several_return_sequences(talker):
    texts = talker.caption([image(1), image(2)], num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, list) and len(t) == 2 for t in texts)
    assert texts[0][0] == talker.caption(image(1), num_beams=3, max_new_tokens=6)


# --- defaults from generation_config.json ---------------------------------------------------------

def test_generation_config_file_settings_are_ignored_as_transformers_does(models, batch, tmp_path, checkpoint):
    # transformers 5.23 generates with language_model.generation_config (from the text config), not
    # with the file's values; miniblip2 does the same so that the same call gives the same tokens.
    folder = shutil.copytree(checkpoint("every-other-cross"), tmp_path / "ckpt")
    path = folder / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"num_beams": 3, "no_repeat_ngram_size": 2,
                                                                "max_new_tokens": 7, "length_penalty": 0.5}))
    ours, theirs = miniblip2.load(folder, progress=False), reference(folder)
    pixels, ids, mask = batch
    with torch.no_grad():
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                   attention_mask=torch.from_numpy(mask)).numpy()
    assert expected.shape[1] == ids.shape[1] + 20  # 20 new tokens, greedy: the file was not read
    assert_same(ours.generate(pixels, ids, mask), expected)


# --- bad arguments --------------------------------------------------------------------------------

BAD = [
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2.5), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), r"smaller or equal to `num_beams`"),
    (dict(num_return_sequences=2), "Greedy methods"), (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(do_sample=True, top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(do_sample=True, temperature=0.0), "strictly positive"), (dict(temperature=-1.0), "temperature"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=-2), "min_new_tokens"), (dict(max_length=3), "max_length"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(length_penalty=float("nan")), "length_penalty"), (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(do_sample="yes"), "do_sample"), (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=VOCAB_SIZE), "eos_token_id"), (dict(eos_token_id=-1), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"), (dict(num_beam=2), "unknown generation argument.*num_beams"),
    (dict(typical_p=0.5), "unknown.*supports"), (dict(seed=1, generator=np.random.default_rng(1)), "not both"),
    (dict(generator=42), "numpy.random.Generator"), (dict(seed=-3), "seed"),
    (dict(num_beams=2, streamer=TextStreamer(None)), "beam search"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[",".join(f"{k}={v}" for k, v in c.items())[:40] for c, _ in BAD])
def test_bad_generation_arguments(models, batch, kwargs, message):
    pixels, ids, mask = (a[:1] for a in batch)
    with pytest.raises(PromptError, match=message):
        models[0].generate(pixels, ids, mask, **kwargs)


def test_stream_refuses_beams_and_lists(talker):
    with pytest.raises(PromptError, match="num_beams=1"):
        list(talker.stream(image(0), num_beams=2))
    with pytest.raises(PromptError, match="one image"):
        list(talker.stream([image(0), image(1)]))



# --- right-padded prompts --------------------------------------------------------------------------
# transformers' generate numbers the prompt's positions itself (padding at 0) and each new token
# one past its row's last column: after right padding the new tokens follow the padding's 0, not
# the text. The ids must still be transformers'.

def right_padded(ids, mask):
    """The same prompts with their padding moved to the right."""
    order = np.argsort(mask == 0, axis=1, kind="stable")  # real columns first, in order
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(mask, order, axis=1)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3, num_return_sequences=2), dict(num_beams=2),
                                    dict(repetition_penalty=1.3, no_repeat_ngram_size=2)],
                         ids=["greedy", "beams-3", "beams-2", "controls"])
def test_right_padded_prompts_give_transformers_ids(models, batch, frequent, kwargs):
    pixels, ids, mask = batch
    ids, mask = right_padded(ids, mask)
    assert (mask[:, -1] == 0).any()  # some rows end in padding
    got, expected = both(models, (pixels, ids, mask), max_new_tokens=NEW_TOKENS, eos_token_id=frequent, **kwargs)
    assert_same(got, expected)
    without_cache = models[0].generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=frequent,
                                       use_cache=False, **kwargs)
    assert_same(without_cache, expected)
