"""Logits processors, warpers and token choosers: how one step's scores become next tokens.

Each function mirrors one class of transformers' generation/logits_process.py (or one line of
generation/utils.py) and works on a whole batch at once: the ids so far [B, S] and the next-token
scores [B, V] in float32, as transformers computes them. Processors (repetition penalty, n-gram
ban, minimum length) apply to every strategy; warpers (temperature, top-k, top-p) only when
sampling. A filtered token gets -inf, so softmax gives it probability exactly 0.

Legend: B rows (inputs x beams or samples), S ids so far (prompt + new), V vocabulary (50304),
K tokens to keep, N n-gram size.
"""

from ..nn import namespace, softmax


# RepetitionPenaltyLogitsProcessor: every token already in the row (prompt included, image
# tokens too; left padding not, via `prompt_ignore_length`) is made less likely: a positive
# score is divided by the penalty, a negative one multiplied, so both move towards -inf.
def repetition_penalty(ids, scores, penalty, prompt_ignore_length=None):  # [B, S], [B, V] -> [B, V]
    xp = namespace(scores)
    B, V = scores.shape
    if prompt_ignore_length is not None:  # padding positions point at a spare column V
        ids = xp.where(xp.arange(ids.shape[1])[None, :] < prompt_ignore_length[:, None], V, ids)
    seen = xp.zeros((B, V + 1), dtype=bool)
    seen[xp.arange(B)[:, None], xp.minimum(ids, V)] = True  # ids past the head's V (none in OPT) are skipped
    penalized = xp.where(scores < 0, scores * penalty, scores / penalty)
    return xp.where(seen[:, :V], penalized, scores)


# NoRepeatNGramLogitsProcessor: a token that would repeat an N-gram already in the row is banned.
# Only windows whose first N-1 ids equal the row's last N-1 ids can be completed, and each such
# window bans its own last id. Left padding counts as ids here, as in transformers.
def no_repeat_ngram(ids, scores, ngram_size):  # [B, S], [B, V] -> [B, V]
    xp = namespace(scores)
    B, S = ids.shape
    V = scores.shape[1]
    if S < ngram_size:
        return scores
    prefix = ids[:, S + 1 - ngram_size:]  # [B, N-1]: the n-gram the next token would complete
    windows = xp.stack([ids[:, i:S - ngram_size + 1 + i] for i in range(ngram_size)], axis=-1)  # [B, S-N+1, N]
    matches = xp.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1)  # [B, S-N+1]
    banned = xp.zeros((B, V + 1), dtype=bool)  # non-matching windows land in the spare column V
    banned[xp.arange(B)[:, None], xp.where(matches, xp.minimum(windows[:, :, -1], V), V)] = True
    return xp.where(banned[:, :V], -xp.inf, scores)


# MinLengthLogitsProcessor: no end-of-sequence id while the row (prompt included) is shorter
# than `min_length`.
def min_length(ids, scores, min_length, eos_token_ids):  # [B, S], [B, V] -> [B, V]
    xp = namespace(scores)
    if ids.shape[1] >= min_length:
        return scores
    is_eos = xp.any(xp.arange(scores.shape[1])[:, None] == xp.asarray(eos_token_ids)[None, :], axis=1)  # [V]
    return xp.where(is_eos[None, :], -xp.inf, scores)


# MinNewTokensLengthLogitsProcessor: the same, counting only the tokens after the prompt.
def min_new_tokens(ids, scores, prompt_length, min_new_tokens, eos_token_ids):  # [B, S], [B, V] -> [B, V]
    return min_length(ids, scores, prompt_length + min_new_tokens, eos_token_ids)


# TemperatureLogitsWarper: < 1 sharpens the distribution, > 1 flattens it.
def temperature(scores, temperature):  # [B, V] -> [B, V]
    return scores / temperature


# TopKLogitsWarper: keep the K highest scores of each row (ties with the K-th are all kept).
def top_k(scores, k, min_tokens_to_keep=1):  # [B, V] -> [B, V]
    xp = namespace(scores)
    k = min(max(k, min_tokens_to_keep), scores.shape[1])
    kth_best = xp.sort(scores, axis=1)[:, -k][:, None]  # [B, 1]
    return xp.where(scores < kth_best, -xp.inf, scores)


# TopPLogitsWarper (nucleus): keep the most likely tokens whose probabilities add up to `top_p`.
# Working upwards from the least likely token, a token is dropped while the probability mass up
# to and including it is at most 1 - top_p. torch's CPU cumsum adds in float64, so this does too.
def top_p(scores, p, min_tokens_to_keep=1):  # [B, V] -> [B, V]
    xp = namespace(scores)
    order = xp.argsort(scores, axis=1, kind="stable")  # [B, V]: least likely first
    ascending = xp.take_along_axis(scores, order, axis=1)
    mass_below = xp.cumsum(softmax(ascending).astype(xp.float64), axis=1).astype(scores.dtype)
    drop_sorted = mass_below <= 1 - p
    drop_sorted[:, -min_tokens_to_keep:] = False
    drop = xp.zeros_like(drop_sorted)
    drop[xp.arange(scores.shape[0])[:, None], order] = drop_sorted  # back to vocabulary order
    return xp.where(drop, -xp.inf, scores)


# The processors and warpers GenerationMixin._get_logits_processor builds, in its order, for the
# settings in `gen` (a GenerationConfig). `min_tokens_to_keep` is 1, or with beam sampling the
# number of EOS ids + 1 so that every beam keeps a token that does not end it.
def process_logits(ids, scores, gen, prompt_length, padding_lengths):  # [B, S], [B, V] -> [B, V]
    eos = gen.eos_token_ids
    if gen.repetition_penalty != 1.0:
        scores = repetition_penalty(ids, scores, gen.repetition_penalty, padding_lengths)
    if gen.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(ids, scores, gen.no_repeat_ngram_size)
    if gen.min_length > 0:
        scores = min_length(ids, scores, gen.min_length, eos)
    if gen.min_new_tokens > 0:
        scores = min_new_tokens(ids, scores, prompt_length, gen.min_new_tokens, eos)
    if gen.do_sample:
        keep = len(eos) + 1 if gen.num_beams > 1 else 1
        if gen.temperature != 1.0:
            scores = temperature(scores, gen.temperature)
        if gen.top_k != 0:
            scores = top_k(scores, gen.top_k, keep)
        if gen.top_p < 1.0:
            scores = top_p(scores, gen.top_p, keep)
    return scores


# `torch.argmax(next_token_scores, dim=-1)` in GenerationMixin._sample (do_sample=False).
def greedy_choice(scores):  # [B, V] -> [B]
    xp = namespace(scores)
    return xp.argmax(scores, axis=-1)


# `torch.multinomial(softmax(scores), 1)` in GenerationMixin._sample (do_sample=True), by the
# Gumbel-max trick: adding independent standard Gumbel noise to the scores and taking the argmax
# draws from softmax(scores) exactly, and filtered tokens (-inf) can never win. The noise comes
# from a seeded generator: the same seed gives the same tokens every time, with torch's
# distribution but not torch's random stream (no seed reproduces torch's own draws).
def sample_choice(scores, rng):  # [B, V] -> [B]
    xp = namespace(scores)
    return xp.argmax(scores + gumbel(rng, scores.shape, xp), axis=-1)


# Standard Gumbel noise [B, V] float64, drawn where the scores are: on the CPU from the NumPy
# Generator; on a GPU from the array library's own (see device.device_generator), which has no
# `gumbel` but has `standard_exponential`: -log(E) of E ~ Exp(1) is standard Gumbel.
def gumbel(rng, shape, xp):
    if hasattr(rng, "gumbel"):
        return xp.asarray(rng.gumbel(size=shape))
    return -xp.log(rng.standard_exponential(size=shape))


# `torch.multinomial(softmax(scores), k)` without replacement, for beam sampling: the k largest of
# scores + Gumbel noise are k successive draws without replacement (the Gumbel-top-k trick),
# in the order they would be drawn.
def sample_without_replacement(scores, k, rng):  # [B, C] -> [B, k]
    xp = namespace(scores)
    return topk(scores + gumbel(rng, scores.shape, xp), k)[1]


# torch.topk(x, k): the k largest of each row, largest first; equal values keep index order.
def topk(x, k):  # [B, M] -> [B, k], [B, k]
    xp = namespace(x)
    indices = xp.argsort(-x, axis=1, kind="stable")[:, :k]
    return xp.take_along_axis(x, indices, axis=1), indices


# torch.log_softmax, as beam search scores continuations with summed log-probabilities.
def log_softmax(x):  # [B, V] -> [B, V]
    xp = namespace(x)
    shifted = x - xp.max(x, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
