"""The decoding loop: prefill the prompt once, then one token at a time with the KV cache.

Mirrors `GenerationMixin.generate` of transformers for greedy search: each row of the batch
stops on its own at an end-of-sequence id and is padded with `pad_token_id` from then on; the
loop ends when every row has stopped or after `max_new_tokens`. The output is the prompt ids
followed by the new ids, as `Blip2ForConditionalGeneration.generate` returns them.

Legend: B batch, T prompt tokens (32 image + text), N new tokens, D width, V vocabulary.
"""

from .nn import namespace
from .opt import embed_tokens, lm_head, new_cache, opt_decoder


# One decoder call returning next-token logits. With a cache only `new_embeds` are run;
# without one the whole sequence so far is run again (slow, kept to test the cache).
def next_token_logits(new_embeds, all_embeds, attention_mask, w, config, cache):  # -> [B, V]
    if cache is not None:
        hidden = opt_decoder(new_embeds, attention_mask, w, config, cache)
    else:
        hidden = opt_decoder(all_embeds, attention_mask, w, config)
    return lm_head(hidden[:, -1:], w)[:, 0]


# GenerationMixin._sample with do_sample=False.
def greedy_search(inputs_embeds, input_ids, attention_mask, w, config, max_new_tokens,
                  eos_token_ids, pad_token_id, use_cache=True):  # [B, T, D], [B, T], [B, T] -> [B, T + N]
    xp = namespace(inputs_embeds)
    B, T, _ = inputs_embeds.shape
    cache = new_cache(config, B, T + max_new_tokens, inputs_embeds.dtype, xp) if use_cache else None
    eos = xp.asarray(list(eos_token_ids), dtype=input_ids.dtype)
    finished = xp.zeros(B, dtype=bool)
    new_embeds = all_embeds = inputs_embeds
    for _ in range(max_new_tokens):
        logits = next_token_logits(new_embeds, all_embeds, attention_mask, w, config, cache)
        next_ids = xp.argmax(logits, axis=-1).astype(input_ids.dtype)  # [B]
        next_ids = xp.where(finished, xp.asarray(pad_token_id, dtype=input_ids.dtype), next_ids)
        input_ids = xp.concat([input_ids, next_ids[:, None]], axis=1)
        attention_mask = xp.concat([attention_mask, xp.ones_like(attention_mask[:, :1])], axis=1)
        finished = finished | xp.any(next_ids[:, None] == eos[None, :], axis=1)
        if bool(xp.all(finished)):
            break
        new_embeds = embed_tokens(next_ids[:, None], w)  # [B, 1, D]
        if cache is None:
            all_embeds = xp.concat([all_embeds, new_embeds], axis=1)
    return input_ids
