"""The decoding loops know a decoder, not a model: here a toy decoder that is neither OPT nor T5
drives them, and greedy, beam search and sampling are checked against results worked out
independently (a plain Python walk, an exhaustive search over every sequence, exact
probabilities).

The toy is a trigram table: the next token's logits depend on the row's last two ids, which the
decoder keeps in its own state. So a beam search that forgot to `reorder` the state would score
beams with another beam's history, and the exhaustive search would disagree.
"""

import itertools

import numpy as np
import pytest

from miniblip2.generation.loops import beam_search, sample_steps
from miniblip2.generation.processors import log_softmax
from miniblip2.generation.settings import GenerationConfig

V, EOS, PAD = 5, 0, 4


class Trigram:
    """The decoder interface of generation/loops.py over a [V, V, V] table of logits."""

    def __init__(self, table, prompt_ids):
        self.table = table
        self.prompt_ids = prompt_ids  # [R, T]
        self.prompt_mask = np.ones_like(prompt_ids)

    def start(self):
        history = self.prompt_ids.copy()
        return self.logits(history), history

    def step(self, next_ids, history):
        history = np.concatenate([history, next_ids[:, None]], axis=1)
        return self.logits(history), history

    def reorder(self, history, rows):
        return history[rows]

    def logits(self, history):
        return self.table[history[:, -2], history[:, -1]].astype(np.float32)  # [R, V]


def toy_table(seed):
    return np.random.default_rng(seed).normal(0, 2, size=(V, V, V)).astype(np.float32)


def log_probs(table, history):  # the toy's log-probabilities of the next id, as the loops compute them
    return log_softmax(table[history[-2], history[-1]].astype(np.float32)[None])[0].astype(np.float64)


def test_greedy_is_the_argmax_walk():
    table, prompts = toy_table(0), np.array([[1, 2], [3, 3], [2, 1]])
    gen = GenerationConfig(max_new_tokens=6, eos_token_ids=(EOS,), pad_token_id=PAD)
    got = np.stack(list(sample_steps(Trigram(table, prompts), gen)), axis=1)
    for row, prompt in enumerate(prompts):
        history, expected = list(prompt), []
        while len(expected) < got.shape[1]:  # after EOS a row is padded; the loop runs while any row is not
            token = PAD if EOS in expected else int(np.argmax(table[history[-2], history[-1]]))
            expected.append(token)
            history.append(token)
        assert got[row].tolist() == expected
    assert got.shape[1] == 6 or (got == EOS).any(axis=1).all()


# Every continuation of `prompt` up to `max_new` new ids (stopping at EOS), scored as beam search
# scores a finished hypothesis: the summed log-probabilities over length ** length_penalty.
def exhaustive(table, prompt, max_new, length_penalty):
    found = []
    for n in range(1, max_new + 1):
        for tail in itertools.product(range(V), repeat=n):
            if EOS in tail[:-1] or (n < max_new and tail[-1] != EOS):
                continue
            history, score = list(prompt), 0.0
            for token in tail:
                score += log_probs(table, history)[token]
                history.append(token)
            found.append((score / n ** length_penalty, list(tail)))
    return sorted(found, key=lambda item: -item[0])


# With as many beams as there are continuations, nothing is pruned, and early_stopping="never"
# with a positive length penalty bounds a running beam by the longest length: the search is
# exact, so its best hypotheses must be the exhaustive search's, in order.
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
def test_wide_beam_search_finds_the_exhaustive_best(length_penalty):
    table, N, K, n = toy_table(1), 3, V ** 2, 3
    prompts = np.array([[1, 2], [4, 3]])
    gen = GenerationConfig(max_new_tokens=N, num_beams=K, num_return_sequences=n, length_penalty=length_penalty,
                           early_stopping="never", eos_token_ids=(EOS,), pad_token_id=PAD)
    got = beam_search(Trigram(table, np.repeat(prompts, K, axis=0)), gen)  # rows expanded K times, as generate does
    for b, prompt in enumerate(prompts):
        best = exhaustive(table, prompt, N, length_penalty)[:n]
        for rank, (_, tail) in enumerate(best):
            row = got[b * n + rank, 2:]
            assert row[:len(tail)].tolist() == tail
            assert (row[len(tail):] == PAD).all()  # shorter hypotheses are padded after EOS


# A table where the greedy first step leads nowhere good: the best first token has a flat
# continuation, the second best a sure one. Greedy takes the first; two beams find the second.
def test_two_beams_beat_greedy_where_worked_out_by_hand():
    table = np.full((V, V, V), -9.0, dtype=np.float32)
    table[1, 2, [1, 2]] = [0.0, -0.2]  # after [1, 2]: 1 (p=0.55) or 2 (p=0.45)
    table[2, 1, [1, 2, 3]] = 0.0  # after 1: three equal choices, p = 1/3 each
    table[2, 2, EOS] = 0.0  # after 2: EOS for sure
    table[2, 1, EOS] = -9.0
    prompts = np.array([[1, 2]])
    greedy = GenerationConfig(max_new_tokens=2, eos_token_ids=(EOS,), pad_token_id=PAD)
    assert [int(ids[0]) for ids in sample_steps(Trigram(table, prompts), greedy)] == [1, 1]
    beams = GenerationConfig(max_new_tokens=2, num_beams=2, eos_token_ids=(EOS,), pad_token_id=PAD)
    # log 0.45 + log 1 = -0.80 beats log 0.55 + log 1/3 = -1.70
    assert beam_search(Trigram(table, np.repeat(prompts, 2, axis=0)), beams)[0, 2:].tolist() == [2, EOS]


# Sampling draws from softmax(logits): 40,000 rows sample their first two tokens, and every
# pair's frequency must be within 5 standard errors of its exact probability (a wrong
# distribution, e.g. sampling the argmax or from unnormalised scores, is off by far more).
@pytest.mark.parametrize("top_k", [0, 2])
def test_sampling_draws_the_exact_distribution(top_k):
    table, R = toy_table(2), 40_000
    prompts = np.tile([[3, 1]], (R, 1))
    gen = GenerationConfig(max_new_tokens=2, do_sample=True, top_k=top_k, eos_token_ids=(V + 1,), pad_token_id=PAD)
    steps = sample_steps(Trigram(table, prompts), gen, np.random.default_rng(0))
    first, second = next(steps), next(steps)
    counts = np.zeros((V, V))
    np.add.at(counts, (first, second), 1)

    def probabilities(history):
        logits = table[history[-2], history[-1]].astype(np.float64)
        if top_k:
            logits = np.where(logits < np.sort(logits)[-top_k], -np.inf, logits)
        p = np.exp(logits - logits.max())
        return p / p.sum()

    exact = np.array([[probabilities([3, 1])[a] * probabilities([1, a])[b] for b in range(V)] for a in range(V)])
    standard_error = np.sqrt(exact * (1 - exact) / R) + 1e-12
    assert np.all(np.abs(counts / R - exact) <= 5 * standard_error)
    if top_k:
        assert np.count_nonzero(counts.sum(axis=1)) == top_k  # the first token only ever from the top 2
