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

from .errors import CheckpointError
from .nn import (
    ACTIVATIONS,
    KVCache,
    attention,
    layer_norm,
    linear,
    linear_shapes,
    merge_heads,
    namespace,
    norm_shapes,
    split_heads,
)
from .runtime.precision import widen
from .runtime.trace import PROBS, record

POSITION_OFFSET = 2  # OPT's position table starts with 2 unused rows (a fairseq padding_idx relic)


# OPTConfig (transformers 5.23 defaults: hub configs store only what differs).
@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    activation_function: str = "relu"
    word_embed_proj_dim: int | None = None  # None: hidden_size
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5  # OPT uses nn.LayerNorm's default; no config key sets it
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 2
    is_encoder_decoder = False  # a class constant, not a config field


# The OPT variants this file runs: every released size but 350m (which projects its embeddings
# and normalises after each block). Anything else is refused rather than run wrongly.
def check_config(c):
    for key, wanted in [("do_layer_norm_before", True), ("enable_bias", True), ("layer_norm_elementwise_affine", True),
                        ("word_embed_proj_dim", c.hidden_size)]:
        if getattr(c, key) not in (wanted, None):
            raise CheckpointError(
                f"text_config.{key} = {getattr(c, key)!r}: miniblip2 runs the OPT layout of blip2-opt-2.7b/6.7b "
                f"({key} = {wanted!r}); this checkpoint's language model is not supported yet")


# Every weight under `language_model.` with its shape, from the config alone.
def expected_shapes(c):
    D, F = c.hidden_size, c.ffn_dim
    shapes = {"model.decoder.embed_tokens.weight": (c.vocab_size, D),
              "model.decoder.embed_positions.weight": (c.max_position_embeddings + POSITION_OFFSET, D),
              **norm_shapes("model.decoder.final_layer_norm", D), "lm_head.weight": (c.vocab_size, D)}
    for i in range(c.num_hidden_layers):
        layer = f"model.decoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= linear_shapes(f"{layer}.self_attn.{name}", D, D)
        shapes |= {**norm_shapes(f"{layer}.self_attn_layer_norm", D), **norm_shapes(f"{layer}.final_layer_norm", D),
                   **linear_shapes(f"{layer}.fc1", F, D), **linear_shapes(f"{layer}.fc2", D, F)}
    return shapes


IGNORED_WEIGHTS = ()  # names a checkpoint may hold that the model does not use (see t5.py)


# OPTForCausalLM._tied_weights_keys: the hub files leave lm_head out; it is the embedding matrix.
def tied_weights(config):
    return {"lm_head.weight": "model.decoder.embed_tokens.weight"}


# An empty KV cache (nn.KVCache) for `capacity` tokens of every layer.
def new_cache(config, batch_size, capacity, dtype, xp):
    H = config.num_attention_heads
    shape = (batch_size, H, capacity, config.hidden_size // H)  # [B, H, capacity, K]
    return KVCache.zeros(config.num_hidden_layers, shape, dtype, xp)


# OPTLearnedPositionalEmbedding: a token's position is the number of real tokens up to it,
# counted from the attention mask, so left padding does not shift the prompt.
def position_ids(attention_mask, past_length):  # [B, S] -> [B, T]
    xp = namespace(attention_mask)
    positions = xp.cumsum(attention_mask, axis=1) * attention_mask - 1  # padding -> -1
    return positions[:, past_length:] + POSITION_OFFSET


# GenerationMixin._prepare_position_ids_for_generation: `generate` numbers the prompt itself,
# padding at 0 (where OPT's own count gives -1), and each new token one past its row's last
# column. With left padding that is OPT's numbering; with right padding the new tokens continue
# from the padding's 0, not from the text, and transformers' ids depend on it.
def generation_position_ids(attention_mask):  # [B, T] -> [B, T]
    xp = namespace(attention_mask)
    return xp.where(attention_mask == 0, 0, xp.cumsum(attention_mask, axis=1) - 1) + POSITION_OFFSET


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
        k, v = cache.add(layer_index, k, v)  # [B, H, S, K]
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


# OPTDecoder.forward on inputs_embeds. `attention_mask` covers the cached tokens and the new ones;
# `positions` [B, T] (rows of the position table) as generate gives them, else from the mask.
def opt_decoder(inputs_embeds, attention_mask, w, config, cache=None, positions=None):  # [B, T, D] -> [B, T, D]
    past = cache.length if cache is not None else 0
    decoder = w["model"]["decoder"]
    table = decoder["embed_positions"]
    rows = position_ids(attention_mask, past) if positions is None else positions  # [B, T]
    positions = record(table, widen(table["weight"][rows]))  # [B, T, D]
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


# --- the decoder interface that generation/loops.py drives ---------------------------------

# What a decoding step carries from one token to the next: the KV cache (None with
# use_cache=False: then `embeds` holds every token so far and each step reruns them all), the
# attention mask over the prompt and the new tokens, and their positions.
@dataclass
class OPTState:
    cache: KVCache | None
    embeds: object  # [R, S, D] without a cache; the last step's [R, 1, D] with one
    attention_mask: object  # [R, S]
    positions: object  # [R, S] rows of the position table


class OPTDecoding:
    """Decoder-only decoding: `start` runs the prompt's embeddings (the image's query outputs at
    the `<image>` positions) once, `step` embeds each row's new id and runs only it, `reorder`
    makes row i the old row rows[i] (beam search). The logits processors see `prompt_ids`, the
    prompt as given, as transformers' do."""

    def __init__(self, w, config, inputs_embeds, attention_mask, input_ids, max_new_tokens, use_cache=True):
        self.w, self.config = w, config
        self.inputs_embeds, self.max_new_tokens, self.use_cache = inputs_embeds, max_new_tokens, use_cache
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask  # [R, T] each

    def start(self):  # -> logits [R, V] float32, state
        xp = namespace(self.inputs_embeds)
        R, T, _ = self.inputs_embeds.shape
        dtype = self.inputs_embeds.dtype
        cache = new_cache(self.config, R, T + self.max_new_tokens, dtype, xp) if self.use_cache else None
        positions = generation_position_ids(self.prompt_mask)
        return self._logits(self.inputs_embeds, OPTState(cache, self.inputs_embeds, self.prompt_mask, positions))

    def step(self, next_ids, state):  # [R] -> logits [R, V] float32, state
        xp = namespace(state.attention_mask)
        new_embeds = embed_tokens(next_ids[:, None], self.w)  # [R, 1, D]
        mask = xp.concat([state.attention_mask, xp.ones_like(state.attention_mask[:, :1])], axis=1)  # [R, S + 1]
        positions = xp.concat([state.positions, state.positions[:, -1:] + 1], axis=1)
        embeds = new_embeds if state.cache is not None else xp.concat([state.embeds, new_embeds], axis=1)
        return self._logits(new_embeds, OPTState(state.cache, embeds, mask, positions))

    def reorder(self, state, rows):  # rows [R]: the old row each new row continues
        cache = state.cache.reorder(rows) if state.cache is not None else None
        return OPTState(cache, state.embeds[rows], state.attention_mask[rows], state.positions[rows])

    def _logits(self, new_embeds, state):
        xp = namespace(new_embeds)
        if state.cache is not None:
            inputs, positions = new_embeds, state.positions[:, -new_embeds.shape[1]:]
        else:  # without a cache: all again
            inputs, positions = state.embeds, state.positions
        hidden = opt_decoder(inputs, state.attention_mask, self.w, self.config, state.cache, positions)
        return lm_head(hidden[:, -1:], self.w)[:, 0].astype(xp.float32), state  # [R, V]
