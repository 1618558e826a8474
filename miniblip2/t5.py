"""The Flan-T5 language model of BLIP-2 (`T5ForConditionalGeneration` in transformers' modeling_t5.py).

encoder: the prompt's embeddings (the image's 32 query outputs, then the prompt text) -> 24
    blocks of bidirectional self-attention and a gated-GELU FFN -> final norm: encoder output.
decoder: the start token, then each new token -> 24 blocks of causal self-attention,
    cross-attention to the encoder output and the FFN -> final norm -> logits through lm_head.

Every block is pre-norm with a residual around each part; the norm is an RMS norm (no mean, no
bias) and no linear layer has a bias. There are no position embeddings: each attention score gets
a learned per-head bias for the bucketed distance from query to key, looked up once in the first
block (its `relative_attention_bias` table) and reused by every block, and no 1/sqrt(K) scale.

Generation runs the encoder once, projects the encoder output to every decoder layer's
cross-attention keys and values once, and then runs one decoder token per step with a cache of
the self-attention keys and values (`T5Decoding`).

Legend (blip2-flan-t5-xl): B batch (R rows when decoding: batch x beams), T encoder tokens
(32 queries + prompt), N decoder tokens in this call, S decoder tokens so far incl. these,
D width (2048), H heads (32), K head width (64), I = H * K attention width (2048), F FFN width
(5120), V vocabulary (32128), U position buckets (32). `w` is `weights["language_model"]`.
"""

import math
from dataclasses import dataclass

from .checkpoint.config import from_dict
from .errors import CheckpointError
from .nn import (
    ACTIVATIONS,
    KVCache,
    attention,
    linear,
    linear_shapes,
    merge_heads,
    namespace,
    norm_shapes,
    rms_norm,
    split_heads,
)
from .runtime.precision import widen
from .runtime.trace import PROBS, record


# T5Config, with transformers 5.23's defaults (hub configs store only what differs). The fields
# left None are derived as T5Config.__post_init__ derives them; a value in config.json wins over
# the derived one, as it does there (blip2-flan-t5-xl says dense_act_fn "gelu": its gated FFN
# runs the exact GELU, not the "gelu_new" that "gated-gelu" alone gives).
@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "<act>" or "gated-<act>"
    dense_act_fn: str | None = None  # None: <act> ("gated-gelu": "gelu_new")
    is_gated_act: bool | None = None  # None: feed_forward_proj starts with "gated-"
    # transformers 5.23 always ties lm_head to `shared` when the file leaves lm_head out; what
    # this flag still decides is whether the decoder output is scaled by d_model^-0.5 (lm_head).
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: tie_word_embeddings (5.23 writes both)
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1
    bos_token_id: int | None = None  # not a T5Config field; Flan-T5 configs set 1
    decoder_start_token_id: int | None = None  # None: bos_token_id, where generate falls back to
    is_encoder_decoder = True  # a class constant, not a config field

    def __post_init__(self):  # frozen, so the derived values are set through object.__setattr__
        act = str(self.feed_forward_proj).split("-")
        derived = {"num_decoder_layers": self.num_layers,
                   "dense_act_fn": "gelu_new" if self.feed_forward_proj == "gated-gelu" else act[-1],
                   "is_gated_act": act[0] == "gated",
                   "scale_decoder_outputs": self.tie_word_embeddings is not False,
                   "decoder_start_token_id": self.bos_token_id}
        for key, value in derived.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)

    @property
    def hidden_size(self):  # T5Config.attribute_map: hidden_size is d_model
        return self.d_model


# T5Config from config.json's text_config, refusing what this file cannot run.
def t5_config(values: dict) -> T5Config:
    config = from_dict(T5Config, values, "text_config")
    act = str(config.feed_forward_proj).split("-")
    if len(act) > 2 or len(act) == 2 and act[0] != "gated":  # T5Config.validate_architecture
        raise CheckpointError(f"text_config.feed_forward_proj = {config.feed_forward_proj!r}: expected "
                              "'<activation>' or 'gated-<activation>', e.g. 'relu' or 'gated-gelu'")
    if config.dense_act_fn not in ACTIVATIONS:
        key = "dense_act_fn" if "dense_act_fn" in values else "feed_forward_proj"
        raise CheckpointError(f"text_config.{key} = {values[key]!r}: activation {config.dense_act_fn!r} is not "
                              f"supported; supported: {tuple(ACTIVATIONS)}")
    if config.decoder_start_token_id is None:
        raise CheckpointError("text_config has neither decoder_start_token_id nor bos_token_id: T5's decoder "
                              "needs a start token (Flan-T5 uses 0, the pad id)")
    # relative_position_bucket divides by the exact half of the encoder's half (U // 4) and by
    # log(max_distance / (U // 2)): both must be positive.
    buckets, distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
    if buckets < 4 or distance <= buckets // 2:
        raise CheckpointError(f"config.json: text_config.relative_attention_num_buckets = {buckets} and "
                              f"relative_attention_max_distance = {distance}: T5 needs at least 4 buckets and a "
                              "max distance above half of them (Flan-T5: 32 and 128); fix or re-download config.json")
    return config


# Every weight under `language_model.` with its shape, from the config alone. encoder/decoder
# .embed_tokens are the model's own names for `shared` (see tied_weights).
def expected_shapes(c):
    D, I, V = c.d_model, c.num_heads * c.d_kv, c.vocab_size
    shapes = {"shared.weight": (V, D), "encoder.embed_tokens.weight": (V, D), "decoder.embed_tokens.weight": (V, D),
              **norm_shapes("encoder.final_layer_norm", D, bias=False),
              **norm_shapes("decoder.final_layer_norm", D, bias=False), "lm_head.weight": (V, D)}
    for stack, n_blocks in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
        attentions = ["SelfAttention", "EncDecAttention"] if stack == "decoder" else ["SelfAttention"]
        for i in range(n_blocks):
            for j, name in enumerate(attentions):  # layer.0 self-attention (decoder: layer.1 cross)
                layer = f"{stack}.block.{i}.layer.{j}"
                shapes |= norm_shapes(f"{layer}.layer_norm", D, bias=False)
                for proj, n_out, n_in in (("q", I, D), ("k", I, D), ("v", I, D), ("o", D, I)):
                    shapes |= linear_shapes(f"{layer}.{name}.{proj}", n_out, n_in, bias=False)
            ff = f"{stack}.block.{i}.layer.{len(attentions)}"
            shapes |= norm_shapes(f"{ff}.layer_norm", D, bias=False) | _feed_forward_shapes(f"{ff}.DenseReluDense", c)
        # only block 0 has the position-bias table; the others reuse its bias
        shapes[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            c.relative_attention_num_buckets, c.num_heads)
    return shapes


def _feed_forward_shapes(prefix, c):
    D, F = c.d_model, c.d_ff
    up = ["wi_0", "wi_1"] if c.is_gated_act else ["wi"]
    shapes = {f"{prefix}.{name}.weight": (F, D) for name in up}
    return shapes | {f"{prefix}.wo.weight": (D, F)}


# T5ForConditionalGeneration._tied_weights_keys: the hub files hold `shared` and leave the
# embed_tokens copies out. lm_head is tied too when the file leaves it out (transformers 5.23
# ties it whatever tie_word_embeddings says); Flan-T5's files hold their own, untied lm_head.
def tied_weights(config):
    return {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight",
            "lm_head.weight": "shared.weight"}


# T5ForConditionalGeneration._keys_to_ignore_on_load_unexpected: a table old files hold, unused
# (cross-attention has no position bias).
IGNORED_WEIGHTS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


# T5Attention._relative_position_bucket. The encoder splits the U buckets between keys before and
# after the query (the "after" half's bucket for distance 0 is never used); the causal decoder
# gives all U to keys before it. Of a direction's buckets the first half are exact distances
# (0..7 of 16 in the encoder); the rest grow logarithmically up to max_distance (128), beyond
# which all distances share the last bucket. The log is float32 and truncated towards zero, as in
# the reference: a bucket edge that is an exact integer in real numbers can land either side, so
# the arithmetic must be float32 in the same order to get the same buckets.
def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):  # [N, S] ints -> [N, S]
    xp = namespace(relative_position)
    buckets = 0
    if bidirectional:  # the encoder: keys after the query get the upper half of the buckets
        num_buckets //= 2
        buckets = (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = xp.abs(relative_position)
    else:  # the decoder: only keys before the query are seen; later ones all land in bucket 0
        distance = -xp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # max(distance, max_exact) only keeps log(0) out of the lanes `where` discards below
    log_ratio = xp.log(xp.maximum(distance, max_exact).astype(xp.float32) / max_exact)
    large = max_exact + (log_ratio / xp.float32(math.log(max_distance / max_exact))
                         * (num_buckets - max_exact)).astype(distance.dtype)
    large = xp.minimum(large, num_buckets - 1)
    return buckets + xp.where(distance < max_exact, distance, large)


# T5Attention.compute_bias's positions: key position minus query position, the queries being the
# last N of S tokens (past = S - N of them are cached).
def relative_positions(xp, query_length, key_length, past=0):  # -> [N, S]
    return xp.arange(key_length)[None, :] - xp.arange(past, past + query_length)[:, None]


# T5Attention.compute_bias: each head's learned bias for each (query, key) distance bucket.
def position_bias(table, relative_position, bidirectional, config):  # [N, S] ints -> [1, H, N, S]
    buckets = relative_position_bucket(relative_position, bidirectional, config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance)
    values = record(table, widen(table["weight"][buckets]))  # [N, S, H]: the nn.Embedding's output
    return values.transpose(2, 0, 1)[None]


# The additive form of a mask, as eager attention adds it: 0 where a key is seen, float32's most
# negative number where not (nn.attention adds it to float32 scores, whatever the dtype).
def additive_mask(visible):  # bool [...] -> float32 [...]
    xp = namespace(visible)
    blocked = xp.asarray(xp.finfo(xp.float32).min, dtype=xp.float32)
    return xp.where(visible, xp.asarray(0, dtype=xp.float32), blocked)


# create_bidirectional_mask: padded encoder tokens are hidden from every query.
def padding_mask(attention_mask):  # [B, T] -> [B, 1, 1, T]
    return additive_mask(attention_mask[:, None, None, :] != 0)


# T5Attention's key and value projections: for self-attention of its input, for cross-attention
# of the encoder output (once per generation, see cross_attention_kv).
def project_kv(x, w, num_heads):  # [B, S, D] -> [B, H, S, K] x2
    return split_heads(linear(x, w["k"]), num_heads), split_heads(linear(x, w["v"]), num_heads)


# T5Attention.forward given its keys and values: no 1/sqrt(K) scale (Mesh TF folded it into the
# initialisation of q) and no biases. `bias` is the position bias plus the mask, added to the
# scores as one term.
def t5_attention(x, keys, values, w, num_heads, bias):  # [B, N, D], [B, H, S, K] x2 -> [B, N, D]
    q = split_heads(linear(x, w["q"]), num_heads)  # [B, H, N, K]
    out, probs = attention(q, keys, values, scale=1.0, mask=bias)
    record(w, probs, PROBS)  # [B, H, N, S]: kept only when tracing (trace.py)
    return linear(merge_heads(out), w["o"])  # [B, N, I] -> [B, N, D]


# T5Attention as self-attention. With a cache the new keys and values are written at its end and
# the queries read everything so far, as opt_attention does.
def self_attention(x, w, num_heads, bias, cache=None, layer_index=0):  # [B, N, D] -> [B, N, D]
    k, v = project_kv(x, w, num_heads)  # [B, H, N, K]
    if cache is not None:
        k, v = cache.add(layer_index, k, v)  # [B, H, S, K]
    return t5_attention(x, k, v, w, num_heads, bias)


# T5DenseGatedActDense (Flan-T5): the activated wi_0 path gates the linear wi_1 path.
# (transformers keeps `wo` in float32 for float16 only, which miniblip2 refuses for T5.)
def gated_feed_forward(x, w, act):  # [B, N, D] -> [B, N, D]
    return linear(act(linear(x, w["wi_0"])) * linear(x, w["wi_1"]), w["wo"])  # via [B, N, F]


# T5DenseActDense (the original T5): wi, activation, wo.
def dense_feed_forward(x, w, act):  # [B, N, D] -> [B, N, D]
    return linear(act(linear(x, w["wi"])), w["wo"])  # via [B, N, F]


# T5LayerFF: pre-norm FFN with a residual.
def feed_forward_layer(x, w, config):  # [B, N, D] -> [B, N, D]
    ffn = gated_feed_forward if config.is_gated_act else dense_feed_forward
    return x + ffn(rms_norm(x, w["layer_norm"], config.layer_norm_epsilon), w["DenseReluDense"],
                   ACTIVATIONS[config.dense_act_fn])


# T5Block of the encoder: layer.0 self-attention, layer.1 FFN.
def encoder_block(x, w, config, bias):  # [B, T, D], [B, H, T, T] -> [B, T, D]
    attn = w["layer"][0]
    x = x + self_attention(rms_norm(x, attn["layer_norm"], config.layer_norm_epsilon), attn["SelfAttention"],
                           config.num_heads, bias)
    return feed_forward_layer(x, w["layer"][1], config)


# T5Stack.forward as the encoder, on inputs_embeds. The position bias of block 0 plus the padding
# mask is one [B, H, T, T] term that every block adds to its scores.
def t5_encoder(inputs_embeds, attention_mask, w, config):  # [B, T, D], [B, T] -> [B, T, D]
    encoder = w["encoder"]
    T = inputs_embeds.shape[1]
    table = encoder["block"][0]["layer"][0]["SelfAttention"]["relative_attention_bias"]
    relative = relative_positions(namespace(inputs_embeds), T, T)  # [T, T]
    bias = position_bias(table, relative, True, config) + padding_mask(attention_mask)  # [B, H, T, T]
    x = inputs_embeds
    for block in encoder["block"]:
        x = record(block, encoder_block(x, block, config, bias))
    return record(encoder["final_layer_norm"], rms_norm(x, encoder["final_layer_norm"], config.layer_norm_epsilon))


# What the decoder's cross-attention reads: every decoder layer's keys and values of the encoder
# output and the encoder's padding mask. They depend on the encoder output alone, so generation
# computes them once (EncoderDecoderCache's cross-attention half).
@dataclass
class CrossAttentionKV:
    keys: list  # per decoder layer [B, H, T, K]
    values: list
    mask: object  # [B, 1, 1, T]


def cross_attention_kv(encoder_output, attention_mask, w, config):  # [B, T, D], [B, T] -> CrossAttentionKV
    layers = [block["layer"][1]["EncDecAttention"] for block in w["decoder"]["block"]]
    kv = [project_kv(encoder_output, layer, config.num_heads) for layer in layers]
    return CrossAttentionKV([k for k, _ in kv], [v for _, v in kv], padding_mask(attention_mask))


# T5Block of the decoder: layer.0 causal self-attention, layer.1 cross-attention (no position
# bias, only the encoder's padding mask), layer.2 FFN.
def decoder_block(x, w, config, bias, cross, cache=None, layer_index=0):  # [B, N, D] -> [B, N, D]
    eps, H = config.layer_norm_epsilon, config.num_heads
    attn, cross_attn, _ = w["layer"]
    x = x + self_attention(rms_norm(x, attn["layer_norm"], eps), attn["SelfAttention"], H, bias, cache, layer_index)
    x = x + t5_attention(rms_norm(x, cross_attn["layer_norm"], eps), cross.keys[layer_index],
                         cross.values[layer_index], cross_attn["EncDecAttention"], H, cross.mask)
    return feed_forward_layer(x, w["layer"][2], config)


# T5Stack.forward as the decoder, on the embeddings of the N new decoder tokens (all of them
# without a cache). No decoder padding: the mask is causal only, as transformers makes it when
# decoder_attention_mask is None.
def t5_decoder(x, w, config, cross, cache=None):  # [B, N, D] -> [B, N, D]
    decoder = w["decoder"]
    past, N = (cache.length if cache is not None else 0), x.shape[1]
    table = decoder["block"][0]["layer"][0]["SelfAttention"]["relative_attention_bias"]
    relative = relative_positions(namespace(x), N, past + N, past)  # [N, S]
    bias = position_bias(table, relative, False, config) + additive_mask(relative <= 0)  # [1, H, N, S]
    for i, block in enumerate(decoder["block"]):
        x = record(block, decoder_block(x, block, config, bias, cross, cache, i))
    if cache is not None:
        cache.length += N
    return record(decoder["final_layer_norm"], rms_norm(x, decoder["final_layer_norm"], config.layer_norm_epsilon))


# nn.Embedding: `shared` is the table Blip2 embeds the prompt with (get_input_embeddings).
def embed_tokens(input_ids, w):  # [B, T] -> [B, T, D]
    return _lookup(w["shared"], input_ids)


# The decoder's own name for the same table (tied to `shared`, see tied_weights).
def decoder_embed_tokens(decoder_input_ids, w):  # [B, N] -> [B, N, D]
    return _lookup(w["decoder"]["embed_tokens"], decoder_input_ids)


def _lookup(table, ids):
    return record(table, widen(table["weight"][ids]))


# T5ForConditionalGeneration's head, no bias. With scale_decoder_outputs (a tied config) the
# decoder output is first scaled by d_model^-0.5, Mesh TF's rescale for sharing the embedding
# matrix as the output layer; Flan-T5 (tie_word_embeddings false) has its own lm_head, unscaled.
def lm_head(hidden, w, config):  # [B, N, D] -> [B, N, V]
    if config.scale_decoder_outputs:
        hidden = hidden * config.d_model ** -0.5
    return record(w["lm_head"], linear(hidden, w["lm_head"]))


# T5ForConditionalGeneration.forward on inputs_embeds with teacher-forced decoder ids.
def t5_forward(inputs_embeds, attention_mask, decoder_input_ids, w, config):  # [B, T, D], [B, T], [B, S] -> [B, S, V]
    encoder_output = t5_encoder(inputs_embeds, attention_mask, w, config)
    cross = cross_attention_kv(encoder_output, attention_mask, w, config)
    return lm_head(t5_decoder(decoder_embed_tokens(decoder_input_ids, w), w, config, cross), w, config)


# --- the decoder interface that generation/loops.py drives ---------------------------------

# What a decoding step carries to the next: the decoder self-attention cache (None with
# use_cache=False: then every step reruns all of `ids`), the cross-attention keys and values,
# and the decoder ids so far.
@dataclass
class T5State:
    cache: KVCache | None
    cross: CrossAttentionKV
    ids: object  # [R, S]


class T5Decoding:
    """Encoder-decoder decoding: `start` runs the encoder once on the prompt's embeddings (the
    image's query outputs, then the text), computes the cross-attention keys and values once, and
    runs the decoder on the start token; `step` runs each row's new id; `reorder` makes row i the
    old row rows[i] (beam search). The logits processors see the decoder ids, which start with
    decoder_start_token_id (transformers' decoder_input_ids)."""

    def __init__(self, w, config, inputs_embeds, attention_mask, max_new_tokens, use_cache=True):
        xp = namespace(inputs_embeds)
        self.w, self.config = w, config
        self.inputs_embeds, self.attention_mask = inputs_embeds, attention_mask  # [R, T, D], [R, T]
        self.max_new_tokens, self.use_cache = max_new_tokens, use_cache
        R = inputs_embeds.shape[0]
        self.prompt_ids = xp.full((R, 1), config.decoder_start_token_id, dtype=xp.int64)  # [R, 1]
        self.prompt_mask = xp.ones_like(self.prompt_ids)  # the decoder prompt has no padding

    def start(self):  # -> logits [R, V] float32, state
        encoder_output = t5_encoder(self.inputs_embeds, self.attention_mask, self.w, self.config)  # [R, T, D]
        cross = cross_attention_kv(encoder_output, self.attention_mask, self.w, self.config)
        cache = self._new_cache(encoder_output) if self.use_cache else None
        return self._logits(self.prompt_ids, T5State(cache, cross, self.prompt_ids))

    def step(self, next_ids, state):  # [R] -> logits [R, V] float32, state
        xp = namespace(state.ids)
        new_ids = next_ids[:, None].astype(state.ids.dtype)  # [R, 1]
        return self._logits(new_ids, T5State(state.cache, state.cross, xp.concat([state.ids, new_ids], axis=1)))

    # The self-attention cache and the ids follow the beams. The cross-attention keys and values
    # stay: beam search moves a row only within its input's group of beams (loops.py), whose
    # rows all hold the same encoder output, so copying them (80 MB a step for xl with 5 beams)
    # would change nothing.
    def reorder(self, state, rows):  # rows [R]: the old row each new row continues
        cache = state.cache.reorder(rows) if state.cache is not None else None
        return T5State(cache, state.cross, state.ids[rows])

    # The start token and the fed-back ids (max_new_tokens - 1 in the loops), with one to spare.
    def _new_cache(self, like):
        xp, c = namespace(like), self.config
        shape = (like.shape[0], c.num_heads, 1 + self.max_new_tokens, c.d_kv)  # [R, H, capacity, K]
        return KVCache.zeros(c.num_decoder_layers, shape, like.dtype, xp)

    def _logits(self, new_ids, state):
        xp = namespace(new_ids)
        ids = new_ids if state.cache is not None else state.ids  # without a cache: all again
        hidden = t5_decoder(decoder_embed_tokens(ids, self.w), self.w, self.config, state.cross, state.cache)
        return lm_head(hidden[:, -1:], self.w, self.config)[:, 0].astype(xp.float32), state  # [R, V]
