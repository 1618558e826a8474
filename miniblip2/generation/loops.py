"""The decoding loops, written once for every language model: greedy, sampling, beam search.

Mirrors transformers' `GenerationMixin` (generation/utils.py), on the rows that
`_expand_inputs_for_generation` makes: each input repeated `num_beams` (or
`num_return_sequences`) times, one after the other, so beams and samples are just more rows of
the batch and the model runs once per step for all of them.

The loops know a decoder, not a model. A decoder (`opt.OPTDecoding`, `t5.T5Decoding`, or the
bigram table of tests/test_decoding.py) offers:

    prompt_ids   [R, T] the ids the logits processors see before any new token (OPT: the
                 prompt; T5: the decoder start token); the output starts with them
    prompt_mask  [R, T] 0 on left padding, which the repetition penalty skips
    start()                 -> logits [R, V] float32, state   run the prompt (T5: the encoder, once)
    step(next_ids [R], state) -> logits [R, V] float32, state  one new token per row
    reorder(state, rows [R])  -> state                         row i continues old row rows[i],
                                                               always a row of the same input

- `sample_steps`: `_sample`, greedy (argmax) or multinomial sampling. Each row stops on its own
  at an end-of-sequence id and is padded with `pad_token_id` from then on; the loop ends when
  every row has stopped or after `max_new_tokens`. A generator of each step's new ids, so the
  text can be streamed while it is generated.
- `beam_search`: `_beam_search`. Each input keeps K running beams and K finished hypotheses;
  every step scores all K x V continuations by summed log-probabilities, keeps the best C
  (2K with one EOS id: enough that K survive even if K of them end), moves those that end into
  the finished set with their length penalty, and reorders the decoder's state to follow the beams.

The output is the prompt ids followed by the new ids, as `generate` returns them. Scores are
float32 from the logits on, as in transformers.

On a GPU nothing comes back to the host inside a step but one small array: the chosen ids
(`sample_steps`, which the caller needs anyway to stream or stop) or whether to stop
(`beam_search`). No Python `if` looks at any other device value.

Legend: B inputs, K beams, R = B x K rows (or B x samples), T prompt tokens, N new tokens,
V vocabulary, C candidates kept per input, L = T + N.
"""

import numpy as np

from ..errors import NonFiniteError
from ..nn import namespace
from ..runtime.device import to_numpy
from .processors import greedy_choice, log_softmax, process_logits, sample_choice, sample_without_replacement, topk

EXCLUDED = -1.0e9  # transformers' score for "never pick this" in beam bookkeeping (finite: sums stay finite)


# _expand_inputs_for_generation: `repeat_interleave`, so an input's copies sit together.
def expand_inputs(times, *arrays):  # [B, ...] -> [B * times, ...] each
    return [namespace(a).repeat(a, times, axis=0) if times > 1 else a for a in arrays]


# The `prompt_ignore_length` transformers gives the repetition penalty: the number of left-pad
# positions of each row (the first position the attention mask marks as real).
def padding_lengths(attention_mask):  # [R, T] -> [R]
    xp = namespace(attention_mask)
    return xp.argmax(attention_mask != 0, axis=1)


# GenerationMixin._sample, one step per iteration: yields the new id of every row [R], as NumPy.
def sample_steps(decoder, gen, rng=None):
    input_ids = decoder.prompt_ids
    xp = namespace(input_ids)
    R, T = input_ids.shape
    eos = xp.asarray(gen.eos_token_ids, dtype=input_ids.dtype)
    pad = xp.asarray(gen.pad_token_id, dtype=input_ids.dtype)
    ignore = padding_lengths(decoder.prompt_mask)
    finished = xp.zeros(R, dtype=bool)
    stopped = np.zeros(R, dtype=bool)  # the same, on the host, from the ids that come back
    logits, state = decoder.start()
    for step in range(gen.max_new_tokens):
        scores = process_logits(input_ids, logits, gen, T, ignore)
        next_ids = sample_choice(scores, rng) if gen.do_sample else greedy_choice(scores)
        # argmax takes a NaN over any number (and an inf too): the chosen score is finite unless the
        # row's scores went wrong. Such a row's id becomes -1, which comes back with the ids.
        broken = ~xp.isfinite(xp.take_along_axis(scores, next_ids[:, None], axis=1)[:, 0]) & ~finished  # [R]
        next_ids = xp.where(finished, pad, next_ids.astype(input_ids.dtype))  # [R]
        next_ids = xp.where(broken, -1, next_ids)
        input_ids = xp.concat([input_ids, next_ids[:, None]], axis=1)
        finished = finished | xp.any(next_ids[:, None] == eos[None, :], axis=1)
        chosen = to_numpy(next_ids)  # the step's one transfer to the host
        check_scores(chosen < 0, step, gen)
        stopped = stopped | np.isin(chosen, gen.eos_token_ids)
        yield chosen
        if stopped.all() or step + 1 == gen.max_new_tokens:
            return
        logits, state = decoder.step(next_ids, state)


# NaN or infinity in a step's scores: the weights, the pixels or a setting (a tiny temperature,
# a huge repetition penalty) overflowed. transformers decodes such scores into arbitrary ids (or
# fails in torch.multinomial); here the rows are named and nothing wrong is returned.
def check_scores(broken, step, gen):  # broken: [R] bool on the host, or one bool for all inputs
    if np.any(broken):
        rows = f"rows {np.flatnonzero(broken).tolist()}" if np.ndim(broken) else "every beam of an input"
        raise NonFiniteError(
            f"the scores of new token {step + 1} are NaN or infinite ({rows}), so no token can be chosen; "
            "the weights or pixel_values hold NaN or infinity, or the settings overflow (temperature="
            f"{gen.temperature}, repetition_penalty={gen.repetition_penalty}). Check the inputs, load the weights "
            "with check_finite=True (the default), or try dtype='float32'")


# GenerationMixin._gather_beams: for each input, the beams (or candidates) listed in `indices`.
def gather_beams(x, indices):  # [B, M, ...], [B, k] -> [B, k, ...]
    xp = namespace(x)
    return xp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


# GenerationMixin._get_top_k_continuations: the best C of the K x V continuations of each input
# (or C sampled without replacement), with the running beam each one extends.
def top_continuations(scores, running, cur_len, C, rng=None):  # [B, K*V], [B, K, L] -> [B, C] x2, [B, C, L]
    xp = namespace(scores)
    K = running.shape[1]
    V = scores.shape[1] // K
    if rng is not None:
        indices = sample_without_replacement(scores, C, rng)
        cand_scores = xp.take_along_axis(scores, indices, axis=1)
    else:
        cand_scores, indices = topk(scores, C)  # [B, C]
    source_beam = indices // V  # which running beam each candidate extends
    cand_seqs = gather_beams(running, source_beam)  # [B, C, L]
    cand_seqs[:, :, cur_len] = indices % V
    return cand_scores, source_beam, cand_seqs


# GenerationMixin._get_running_beams_for_next_iteration: the best K candidates that did not end.
def next_running_beams(cand_scores, cand_seqs, source_beam, ended, K):  # -> [B, K, L], [B, K], [B, K]
    xp = namespace(cand_scores)
    alive_scores = cand_scores + ended.astype(xp.float32) * EXCLUDED
    scores, best = topk(alive_scores, K)
    return gather_beams(cand_seqs, best), scores, gather_beams(source_beam, best)


# GenerationMixin._update_finished_beams: candidates among the first K that just ended join the
# finished set with score sum / length ** length_penalty; the best K of old and new stay.
# `lengths` counts each hypothesis's new tokens (transformers counts its beam_indices).
def update_finished(finished, cand_seqs, cand_scores, ended, improvable, gen, cur_len, T):
    xp = namespace(cand_scores)
    seqs, scores, lengths, done = finished  # [B, K, L], [B, K], [B, K], [B, K]
    K, C = scores.shape[1], cand_scores.shape[1]
    just_ended = ended & (xp.arange(C) < K)[None, :]  # [B, C]: only the top K may finish
    new_length = cur_len + 1 - T
    new_scores = cand_scores / float(new_length ** gen.length_penalty)
    full = xp.all(done, axis=1, keepdims=True) & (gen.early_stopping is True)  # [B, 1]: nothing may join
    new_scores = new_scores + full.astype(xp.float32) * EXCLUDED
    new_scores = new_scores + (~improvable).astype(xp.float32) * EXCLUDED  # nor where nothing can improve
    new_scores = new_scores + (~just_ended).astype(xp.float32) * EXCLUDED
    scores, best = topk(xp.concat([scores, new_scores], axis=1), K)  # of K old + C new
    new_lengths = xp.full(cand_scores.shape, new_length, dtype=lengths.dtype)
    merged = [xp.concat(pair, axis=1) for pair in [(seqs, cand_seqs), (lengths, new_lengths), (done, just_ended)]]
    seqs, lengths, done = (gather_beams(x, best) for x in merged)
    return seqs, scores, lengths, done


# GenerationMixin._check_early_stop_heuristic: can a running beam still beat the worst finished
# hypothesis? Its best possible score is guessed at the current length, or (early_stopping
# "never" with a positive length penalty) at the longest length allowed.
def still_improvable(improvable, running_scores, finished, gen, cur_len, T, max_length):  # -> [B, 1]
    xp = namespace(running_scores)
    _, scores, _, done = finished
    best_length = max_length - T if gen.early_stopping == "never" and gen.length_penalty > 0 else cur_len - T
    best_running = running_scores[:, :1] / float(best_length ** gen.length_penalty)
    worst_finished = xp.where(done, xp.min(scores, axis=1, keepdims=True), xp.asarray(EXCLUDED, dtype=scores.dtype))
    return improvable & xp.any(best_running > worst_finished, axis=1, keepdims=True)


# GenerationMixin._beam_search on rows already expanded to B x K. Rows of the output: each
# input's best `num_return_sequences` hypotheses, best first.
def beam_search(decoder, gen, rng=None):  # -> [B*n, L]
    input_ids = decoder.prompt_ids
    xp = namespace(input_ids)
    R, T = input_ids.shape
    K = gen.num_beams
    B, L = R // K, T + gen.max_new_tokens
    C = max(2, 1 + len(gen.eos_token_ids)) * K
    eos = xp.asarray(gen.eos_token_ids, dtype=input_ids.dtype)
    # `pad_token_id or eos_token_id[0]`: a pad id of 0 is falsy there, so EOS fills instead.
    fill = gen.pad_token_id or gen.eos_token_ids[0]
    running = xp.full((B, K, L), fill, dtype=input_ids.dtype)
    running[:, :, :T] = input_ids.reshape(B, K, T)
    running_scores = xp.zeros((B, K), dtype=xp.float32)
    running_scores[:, 1:] = EXCLUDED  # only beam 0 may start: the K copies are the same
    # the finished hypotheses: ids, score, number of new tokens, whether the slot holds one
    finished = (xp.asarray(running, copy=True), xp.full((B, K), EXCLUDED, dtype=xp.float32),
                xp.zeros((B, K), dtype=input_ids.dtype), xp.zeros((B, K), dtype=bool))
    improvable = xp.ones((B, 1), dtype=bool)
    ignore = padding_lengths(decoder.prompt_mask)
    logits, state = decoder.start()
    for cur_len in range(T, L):
        log_probs = process_logits(running[:, :, :cur_len].reshape(R, cur_len), log_softmax(logits), gen, T, ignore)
        V = log_probs.shape[1]
        totals = (log_probs.reshape(B, K, V) + running_scores[:, :, None]).reshape(B, K * V)
        draw = rng if gen.do_sample else None  # beam sampling: draw the candidates instead of taking the best
        cand_scores, source_beam, cand_seqs = top_continuations(totals, running, cur_len, C, draw)
        ended = xp.any(cand_seqs[:, :, cur_len, None] == eos, axis=-1) | (cur_len + 1 >= L)  # [B, C]
        running, running_scores, beam_idx = next_running_beams(cand_scores, cand_seqs, source_beam, ended, K)
        finished = update_finished(finished, cand_seqs, cand_scores, ended, improvable, gen, cur_len, T)
        improvable = still_improvable(improvable, running_scores, finished, gen, cur_len + 1, T, L)
        all_done = xp.all(finished[3]) & (gen.early_stopping is True)
        # NaN sorts last, so an input's best candidate is NaN only when all its scores are NaN (an
        # inf logit gives NaN log-probabilities too): the flag comes back with the stop flag, as 2.
        broken = xp.any(xp.isnan(cand_scores[:, 0]))
        flags = int((~xp.any(improvable) | all_done | xp.all(ended)) + 2 * broken)  # the step's one transfer
        check_scores(flags >= 2, cur_len - T, gen)
        if flags:
            break
        rows = (beam_idx + xp.arange(B)[:, None] * K).reshape(R)  # each new row's source row
        logits, state = decoder.step(running[:, :, cur_len].reshape(R), decoder.reorder(state, rows))
    seqs, _, lengths, _ = finished
    n = gen.num_return_sequences
    out_length = T + int(xp.max(lengths[:, :n]))
    return seqs[:, :n, :out_length].reshape(B * n, out_length)
