"""The OPT language model of BLIP-2 (`OPTForCausalLM` in transformers' modeling_opt.py).

token embeddings (the image's query outputs already put at the `<image>` positions)
    + learned positions -> 32 pre-LN decoder layers with causal self-attention and a ReLU
    FFN -> final layer norm -> logits through the tied embedding matrix.

A key/value cache keeps each layer's keys and values so that a generation step runs only the
new token through the model.

Legend: B batch, T tokens in this call, S tokens so far incl. these (the cache length plus T),
D width (2560), H heads (32), K head width (80), F FFN width (10240), V vocabulary (50304).
`w` is `weights["language_model"]`.
"""

from dataclasses import dataclass

from .nn import ACTIVATIONS, attention, layer_norm, linear, merge_heads, namespace, split_heads
from .runtime.precision import widen
from .runtime.trace import PROBS, record

POSITION_OFFSET = 2  # OPT's position table starts with 2 unused rows (a fairseq padding_idx relic)


# DynamicCache, preallocated: one [B, H, capacity, K] buffer per layer for keys and for values,
# filled up to `length`.
@dataclass
class KVCache:
    keys: list
    values: list
    length: int = 0

    @property
    def capacity(self):
        return self.keys[0].shape[2]


def new_cache(config, batch_size, capacity, dtype, xp):
    H = config.num_attention_heads
    shape = (batch_size, H, capacity, config.hidden_size // H)
    layers = range(config.num_hidden_layers)
    return KVCache([xp.zeros(shape, dtype=dtype) for _ in layers], [xp.zeros(shape, dtype=dtype) for _ in layers])


# Cache.reorder_cache, for beam search: row i of the new cache is row beam_idx[i] of the old one,
# so each surviving beam keeps the keys and values of the beam it extends.
def reorder_cache(cache, beam_idx):  # [R] indices into the cache's rows
    return KVCache([k[beam_idx] for k in cache.keys], [v[beam_idx] for v in cache.values], cache.length)


# OPTLearnedPositionalEmbedding: a token's position is the number of real tokens up to it,
# counted from the attention mask, so left padding does not shift the prompt.
def position_ids(attention_mask, past_length):  # [B, S] -> [B, T]
    xp = namespace(attention_mask)
    positions = xp.cumsum(attention_mask, axis=1) * attention_mask - 1  # padding -> -1
    return positions[:, past_length:] + POSITION_OFFSET


# create_causal_mask: query i sees key j when j <= i and key j is not padding. Additive form:
# 0 where visible, the dtype's most negative number where not.
def causal_mask(attention_mask, past_length, dtype):  # [B, S] -> [B, 1, T, S]
    xp = namespace(attention_mask)
    S = attention_mask.shape[1]
    query_pos = xp.arange(past_length, S)[:, None]  # [T, 1]
    key_pos = xp.arange(S)[None, :]  # [1, S]
    visible = (key_pos <= query_pos)[None] & (attention_mask[:, None, :] == 1)  # [B, T, S]
    blocked = xp.asarray(xp.finfo(dtype).min, dtype=dtype)
    return xp.where(visible, xp.asarray(0, dtype=dtype), blocked)[:, None]


# OPTAttention: q is scaled before the product, as in the reference. With a cache, the new keys
# and values are written at the cache's end and attention reads everything so far.
def opt_attention(x, w, num_heads, mask, cache=None, layer_index=0):  # [B, T, D] -> [B, T, D]
    q = split_heads(linear(x, w["q_proj"]) * (x.shape[-1] // num_heads) ** -0.5, num_heads)  # [B, H, T, K]
    k = split_heads(linear(x, w["k_proj"]), num_heads)
    v = split_heads(linear(x, w["v_proj"]), num_heads)
    if cache is not None:
        start, end = cache.length, cache.length + x.shape[1]
        cache.keys[layer_index][:, :, start:end] = k
        cache.values[layer_index][:, :, start:end] = v
        k = cache.keys[layer_index][:, :, :end]  # [B, H, S, K]
        v = cache.values[layer_index][:, :, :end]
    out, probs = attention(q, k, v, scale=1.0, mask=mask)
    record(w, probs, PROBS)  # [B, H, T, S]: kept only when tracing (trace.py)
    return linear(merge_heads(out), w["out_proj"])


# OPTDecoderLayer with do_layer_norm_before (every OPT size but 350m).
def opt_layer(x, w, config, mask, cache=None, layer_index=0):  # [B, T, D] -> [B, T, D]
    eps = config.layer_norm_eps
    h = layer_norm(x, w["self_attn_layer_norm"], eps)
    x = x + opt_attention(h, w["self_attn"], config.num_attention_heads, mask, cache, layer_index)
    h = layer_norm(x, w["final_layer_norm"], eps)
    return x + linear(ACTIVATIONS[config.activation_function](linear(h, w["fc1"])), w["fc2"])  # via [B, T, F]


# OPTDecoder.forward on inputs_embeds. `attention_mask` covers the cached tokens and the new ones.
def opt_decoder(inputs_embeds, attention_mask, w, config, cache=None):  # [B, T, D], [B, S] -> [B, T, D]
    past = cache.length if cache is not None else 0
    decoder = w["model"]["decoder"]
    table = decoder["embed_positions"]
    positions = record(table, widen(table["weight"][position_ids(attention_mask, past)]))  # [B, T, D]
    mask = causal_mask(attention_mask, past, inputs_embeds.dtype)
    x = inputs_embeds + positions
    for i, layer in enumerate(decoder["layers"]):
        x = record(layer, opt_layer(x, layer, config, mask, cache, i))
    if cache is not None:
        cache.length += x.shape[1]
    return record(decoder["final_layer_norm"], layer_norm(x, decoder["final_layer_norm"], config.layer_norm_eps))


# OPTDecoder.embed_tokens.
def embed_tokens(input_ids, w):  # [B, T] -> [B, T, D]
    table = w["model"]["decoder"]["embed_tokens"]
    return record(table, widen(table["weight"][input_ids]))


# OPTForCausalLM.lm_head: tied to embed_tokens in every OPT checkpoint; no bias.
def lm_head(hidden, w):  # [B, T, D] -> [B, T, V]
    return record(w["lm_head"], linear(hidden, w["lm_head"]))
