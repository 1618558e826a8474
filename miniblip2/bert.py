"""BERT's post-LN transformer pieces (transformers' modeling_bert.py), shared by every BERT-style
tower: the Q-Former of BLIP-2 (qformer.py) and BLIP's text encoder and decoder (`BlipTextModel`
and `BlipTextLMHeadModel` in modeling_blip_text.py; blip.py is their glue).

    text_embeddings    word + learned absolute position            (Blip2TextEmbeddings)
    bert_embeddings    the same, then LayerNorm                    (BlipTextEmbeddings)
    padding_mask       [B, S] of 0/1 -> additive [B, 1, 1, S]      (create_bidirectional_mask)
    attention_block    attention, dense, LayerNorm(out + x)        (BertAttention = SelfAttention + SelfOutput)
    feed_forward       dense, activation, dense, LayerNorm(out + x) (BertIntermediate + BertOutput)
    bert_layer         self-attention, cross-attention, feed-forward (BlipTextLayer)
    text_encoder       bidirectional, reading the image or not: BLIP's VQA question encoder and
                       its matching models' text tower (BlipTextModel)
    text_pooler        dense + tanh on the first row ([CLS])        (BlipTextPooler)
    text_decoder       causal, with a KV cache, reading the image or the question (BlipTextModel)
    lm_head            dense, GELU, LayerNorm, then the tied word embeddings (BlipTextOnlyMLMHead)
    BlipDecoding       BLIP's text decoder for generation/loops.py

Post-LN: each block's output is added to its input and then layer-normed, unlike the pre-LN ViT.
The same attention block does self-attention (`context` is `x`) and cross-attention (`context`
is the image): only where the keys and values come from differs. While decoding, the
self-attention keys and values of the tokens so far are cached (nn.KVCache), and the
cross-attention ones are computed once from the context, which does not change (ContextKV).

Legend: B batch, T rows (text tokens, or 32 queries + text tokens in BLIP-2's matching), S keys
(T in self-attention, 577 image tokens of BLIP's ViT at 384 px in cross-attention), D width (768),
E context width (768 for blip-image-captioning-base, 1024 for -large, 1408 for BLIP-2's ViT), H
heads (12), K head width (64), F feed-forward width (3072), V vocabulary (30524 in BLIP: BERT's
30522 + [DEC] + [ENC]), P positions (512). `config` is a BERT-style tower's config
(qformer.QFormerConfig, BlipTextConfig): it has num_attention_heads, hidden_act and layer_norm_eps.
"""

from dataclasses import dataclass

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
from .opt import causal_mask, new_cache
from .runtime.precision import like_weight, widen
from .runtime.trace import PROBS, record


# BlipTextConfig (transformers 5.23 defaults: hub configs store only what differs). The released
# BLIP checkpoints all say 12 heads where the class default is 8.
@dataclass(frozen=True)
class BlipTextConfig:
    vocab_size: int = 30524  # BERT's 30522, then [DEC] (the decoder's BOS) and [ENC]
    hidden_size: int = 768
    encoder_hidden_size: int = 768  # the image's width: BlipConfig sets it to vision_config.hidden_size
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    bos_token_id: int | None = 30522  # [DEC]: every caption and answer starts from it
    eos_token_id: int | tuple[int, ...] | None = 2  # only in the empty prompt generate builds, then cut off
    pad_token_id: int | None = 0
    sep_token_id: int | None = 102  # [SEP]: generation stops at it
    is_decoder: bool = True  # every layer has cross-attention (the VQA encoder's too)


# The weights of one attention block (`prefix` is e.g. "encoder.layer.0.crossattention"): query
# from the rows (D wide), key and value from the context (D for self-, E for cross-attention).
# The inner module is `self` in BERT and BLIP's text model, `attention` in the Q-Former.
def attention_shapes(prefix, D, context_width, inner="attention"):
    return {**linear_shapes(f"{prefix}.{inner}.query", D, D),
            **linear_shapes(f"{prefix}.{inner}.key", D, context_width),
            **linear_shapes(f"{prefix}.{inner}.value", D, context_width),
            **linear_shapes(f"{prefix}.output.dense", D, D), **norm_shapes(f"{prefix}.output.LayerNorm", D)}


# The weights of one feed-forward block, under the names the checkpoint gives its two halves
# (the Q-Former has two such blocks per layer: `intermediate_query`/`output_query` and `intermediate`/`output`).
def feed_forward_shapes(intermediate, output, D, F):
    return {**linear_shapes(f"{intermediate}.dense", F, D), **linear_shapes(f"{output}.dense", D, F),
            **norm_shapes(f"{output}.LayerNorm", D)}


def embedding_shapes(vocab_size, max_positions, D):
    return {"word_embeddings.weight": (vocab_size, D), "position_embeddings.weight": (max_positions, D)}


# BlipTextModel(add_pooling_layer=False), under `text_encoder.` or `text_decoder.bert.`: every
# layer reads the image (or the question) through cross-attention, which BlipTextLayer builds
# only when the config says is_decoder (true in every released BLIP checkpoint).
def text_model_shapes(c):
    D, F = c.hidden_size, c.intermediate_size
    shapes = {f"embeddings.{name}": shape for name, shape in
              embedding_shapes(c.vocab_size, c.max_position_embeddings, D).items()}
    shapes |= norm_shapes("embeddings.LayerNorm", D)
    for i in range(c.num_hidden_layers):
        layer = f"encoder.layer.{i}"
        shapes |= {**attention_shapes(f"{layer}.attention", D, D, inner="self"),
                   **feed_forward_shapes(f"{layer}.intermediate", f"{layer}.output", D, F)}
        if c.is_decoder:
            shapes |= attention_shapes(f"{layer}.crossattention", D, c.encoder_hidden_size, inner="self")
    return shapes


# BlipTextPooler, under `pooler.` of a BlipTextModel built with its pooling layer (BlipModel's).
def pooler_shapes(c):
    return linear_shapes("dense", c.hidden_size, c.hidden_size)


# BlipTextOnlyMLMHead, under `text_decoder.cls.`.
def lm_head_shapes(c):
    D, V = c.hidden_size, c.vocab_size
    return {"predictions.bias": (V,), **linear_shapes("predictions.transform.dense", D, D),
            **norm_shapes("predictions.transform.LayerNorm", D), **linear_shapes("predictions.decoder", V, D)}


# BlipTextLMHeadModel._tied_weights_keys (names under `text_decoder.`): a file may leave the
# output layer out; it is then the word embeddings and `predictions.bias`. A file that holds it
# (blip-vqa-base holds `decoder.weight`) is read as it is, as transformers 5.23 reads it.
def lm_head_tied_weights():
    return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}


# Word + position vectors. The sum is rounded to the table's dtype, as torch adds two float16
# (bfloat16) embeddings.
def word_and_position(input_ids, position_ids, w):  # [B, T], [B or 1, T] -> [B, T, D]
    words = widen(w["word_embeddings"]["weight"][input_ids])  # [B, T, D]
    positions = widen(w["position_embeddings"]["weight"][position_ids])  # [1 or B, T, D]
    return like_weight(words + positions, w["word_embeddings"]["weight"])


# Blip2TextEmbeddings.forward(input_ids): a learned vector per token plus one per position 0..T-1.
# No LayerNorm here: in BLIP-2 the Q-Former's `layernorm` normalises queries and text together.
def text_embeddings(input_ids, w):  # [B, T] ints -> [B, T, D]
    xp = namespace(input_ids)
    return record(w, word_and_position(input_ids, xp.arange(input_ids.shape[1])[None], w))


# BlipTextEmbeddings.forward: word + position, then LayerNorm. The positions are 0..T-1 after the
# cached tokens, or those `generate` gives (generation_position_ids).
def bert_embeddings(input_ids, position_ids, w, eps):  # [B, T], [B or 1, T] -> [B, T, D]
    return record(w, layer_norm(word_and_position(input_ids, position_ids, w), w["LayerNorm"], eps))


# GenerationMixin._prepare_position_ids_for_generation: `generate` numbers a row's real tokens
# 0, 1, ... from the attention mask and gives padding 0; each new token is one past its row's
# last column (BlipDecoding.step). With right padding that last column is padding, at 0.
def generation_position_ids(attention_mask):  # [B, T] -> [B, T]
    xp = namespace(attention_mask)
    return xp.where(attention_mask == 0, 0, xp.cumsum(attention_mask, axis=1) - 1)


# create_bidirectional_mask (BERT's extended attention mask): every row may attend to every key
# that is not padding, in both directions. Additive: 0 where seen, float32's most negative number
# where not (nn.attention adds it to float32 scores). No row is all padding, so no row is all -inf.
def padding_mask(attention_mask):  # [B, S] of 0/1 -> [B, 1, 1, S]: broadcasts over heads and rows
    xp = namespace(attention_mask)
    blocked = xp.asarray(xp.finfo(xp.float32).min, dtype=xp.float32)
    return xp.where(attention_mask[:, None, None, :] != 0, xp.asarray(0, dtype=xp.float32), blocked)


# BertAttention's inner module: `self` in BERT and BLIP's text model, `attention` in the Q-Former.
def inner_attention(w):
    return w["self"] if "self" in w else w["attention"]


# The keys and values of `context` for one attention module, split into heads.
def project_kv(context, w, num_heads):  # [B, S, D or E] -> [B, H, S, K] x2
    return split_heads(linear(context, w["key"]), num_heads), split_heads(linear(context, w["value"]), num_heads)


# Blip2QFormerMultiHeadAttention / BlipTextSelfAttention (BertSelfAttention) given its keys and
# values: queries from `x`, scores scaled by 1/sqrt(K).
def attend(x, keys, values, w, num_heads, mask=None):  # [B, T, D], [B, H, S, K] x2 -> [B, T, D]
    q = split_heads(linear(x, w["query"]), num_heads)  # [B, H, T, K]
    out, probs = attention(q, keys, values, scale=q.shape[-1] ** -0.5, mask=mask)
    record(w, probs, PROBS)  # [B, H, T, S]: kept only when tracing (trace.py)
    return merge_heads(out)


# The same with keys and values from `context` (`x` itself for self-attention, the image for
# cross-attention).
def multi_head_attention(x, context, w, num_heads, mask=None):  # [B, T, D], [B, S, D or E] -> [B, T, D]
    return attend(x, *project_kv(context, w, num_heads), w, num_heads, mask)


# Blip2QFormerAttention / BlipTextAttention (BertAttention): attention, then BertSelfOutput's
# dense and LayerNorm(out + x).
def attention_block(x, context, w, config, mask=None):  # [B, T, D] -> [B, T, D]
    keys, values = project_kv(context, inner_attention(w), config.num_attention_heads)  # [B, H, S, K]
    return attention_block_kv(x, keys, values, w, config, mask)


# The same block on keys and values already projected: the cache's, or the context's (ContextKV).
def attention_block_kv(x, keys, values, w, config, mask=None):  # [B, T, D], [B, H, S, K] x2 -> [B, T, D]
    out = attend(x, keys, values, inner_attention(w), config.num_attention_heads, mask)
    return record(w, layer_norm(linear(out, w["output"]["dense"]) + x, w["output"]["LayerNorm"], config.layer_norm_eps))


# BlipTextAttention as self-attention with past_key_values: the new rows' keys and values are
# written at the cache's end and the queries read every one so far, as opt_attention does.
def self_attention_block(x, w, config, mask, cache=None, layer_index=0):  # [B, T, D] -> [B, T, D]
    keys, values = project_kv(x, inner_attention(w), config.num_attention_heads)  # [B, H, T, K]
    if cache is not None:
        keys, values = cache.add(layer_index, keys, values)  # [B, H, S, K]
    return attention_block_kv(x, keys, values, w, config, mask)


# BertIntermediate + BertOutput: widen, activate, narrow, then LayerNorm(out + x).
def feed_forward(x, intermediate, output, config):  # [B, T, D] -> [B, T, F] -> [B, T, D]
    h = ACTIVATIONS[config.hidden_act](linear(x, intermediate["dense"]))
    return layer_norm(linear(h, output["dense"]) + x, output["LayerNorm"], config.layer_norm_eps)


# What every layer's cross-attention reads: its keys and values of the context (the image
# embeddings, or the VQA question's encoding). They depend on the context alone, so a generation
# computes them once (EncoderDecoderCache's cross-attention half). There is no mask: BLIP's
# cross-attention sees every context token, padding included (BlipTextAttention does not pass
# encoder_attention_mask on to BlipTextSelfAttention, so transformers 5.23 never applies it).
@dataclass
class ContextKV:
    keys: list  # per layer [B, H, S, K]
    values: list

    # GenerationMixin._expand_inputs_for_generation: each row `times` times in a row, for its beams.
    def repeat(self, times):
        xp = namespace(self.keys[0])
        rows = lambda arrays: [xp.repeat(a, times, axis=0) for a in arrays]  # [B, ...] -> [B * times, ...]
        return ContextKV(rows(self.keys), rows(self.values))


# BlipTextSelfAttention's key and value of `encoder_hidden_states`, for every layer's
# crossattention: what its cache keeps after the first step (is_updated).
def context_kv(context, layers, config):  # [B, S, E] -> ContextKV
    kv = [project_kv(context, inner_attention(layer["crossattention"]), config.num_attention_heads)
          for layer in layers]
    return ContextKV([k for k, _ in kv], [v for _, v in kv])


# BlipTextLayer: self-attention (causal in the decoder, with its cache), cross-attention to the
# context, feed-forward. Without a context (no encoder_hidden_states: BLIP's text alone, for
# ITC and BlipModel) the layer skips its cross-attention, weights and all.
def bert_layer(x, w, config, mask, context, cache=None, layer_index=0):  # [B, T, D] -> [B, T, D]
    x = self_attention_block(x, w["attention"], config, mask, cache, layer_index)
    if context is not None:
        x = attention_block_kv(x, context.keys[layer_index], context.values[layer_index], w["crossattention"], config)
    return feed_forward(x, w["intermediate"], w["output"], config)


# BlipTextModel.forward(input_ids, attention_mask, encoder_hidden_states=image) as BLIP's VQA
# question encoder and ITM text tower: positions 0..L-1, bidirectional self-attention under the
# padding mask, cross-attention to every image token in every layer, no pooler. With
# image_embeds None, the text alone (ITC, BlipModel): no cross-attention.
def text_encoder(input_ids, attention_mask, image_embeds, w, config):  # [B, L], [B, L] or None, [B, S, E] -> [B, L, D]
    xp = namespace(input_ids)
    x = bert_embeddings(input_ids, xp.arange(input_ids.shape[1])[None], w["embeddings"], config.layer_norm_eps)
    mask = None if attention_mask is None else padding_mask(attention_mask)  # [B, 1, 1, L]
    image = None if image_embeds is None else context_kv(image_embeds, w["encoder"]["layer"], config)
    for i, layer in enumerate(w["encoder"]["layer"]):
        x = record(layer, bert_layer(x, layer, config, mask, image, layer_index=i))
    return x


# BlipTextPooler: BERT's "pooled" text, the first row ([CLS]) through a dense layer and tanh.
# tanh runs in float32 and is rounded once, as torch's half kernel does. `w` is `weights[...]["pooler"]`.
def text_pooler(hidden, w):  # [B, L, D] -> [B, D]
    xp = namespace(hidden)
    pooled = linear(hidden[:, 0], w["dense"])  # [B, D]
    return record(w, like_weight(xp.tanh(pooled.astype(xp.float32, copy=False)), w["dense"]["weight"]))


# BlipTextModel.forward(..., is_decoder=True), the decoder's body: causal self-attention over the
# tokens so far (`attention_mask` covers the cached tokens and these), cross-attention to the
# context. `w` is `weights["text_decoder"]["bert"]`.
def text_decoder(input_ids, position_ids, attention_mask, context, w, config, cache=None):  # [B, T] -> [B, T, D]
    xp = namespace(input_ids)
    past = cache.length if cache is not None else 0
    x = bert_embeddings(input_ids, position_ids, w["embeddings"], config.layer_norm_eps)
    mask = causal_mask(attention_mask, past, xp.float32)  # [B, 1, T, S]: create_causal_mask, as OPT's
    for i, layer in enumerate(w["encoder"]["layer"]):
        x = record(layer, bert_layer(x, layer, config, mask, context, cache, i))
    if cache is not None:
        cache.length += x.shape[1]
    return x


# BlipTextLMPredictionHead: transform (dense, activation, LayerNorm), then `decoder`, whose weight
# is tied to the word embeddings and whose bias is `predictions.bias` (see lm_head_tied_weights).
# `w` is `weights["text_decoder"]["cls"]`.
def lm_head(hidden, w, config):  # [B, T, D] -> [B, T, V]
    p = w["predictions"]
    h = ACTIVATIONS[config.hidden_act](linear(hidden, p["transform"]["dense"]))
    h = record(p["transform"], layer_norm(h, p["transform"]["LayerNorm"], config.layer_norm_eps))
    return record(p["decoder"], linear(h, p["decoder"]))


# --- the decoder interface that generation/loops.py drives ---------------------------------

# What a decoding step carries to the next: the self-attention cache (None with use_cache=False:
# then every step reruns all of `ids`), the ids, their attention mask and their positions.
@dataclass
class BlipState:
    cache: KVCache | None
    ids: object  # [R, S]
    attention_mask: object  # [R, S]
    positions: object  # [R, S]


class BlipDecoding:
    """BlipTextLMHeadModel.generate: `start` runs the prompt (BOS, or BOS and a caption's prefix)
    once, `step` runs each row's new id, `reorder` makes row i the old row rows[i] (beam search).
    The context's cross-attention keys and values (`context`, a ContextKV over the R rows) are
    computed by the caller once and never change. The logits processors see the prompt ids."""

    def __init__(self, w, config, input_ids, attention_mask, context, max_new_tokens, use_cache=True):
        self.w, self.config, self.context = w, config, context  # w: weights["text_decoder"]
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask  # [R, T] each
        self.max_new_tokens, self.use_cache = max_new_tokens, use_cache

    def start(self):  # -> logits [R, V] float32, state
        xp = namespace(self.prompt_ids)
        R, T = self.prompt_ids.shape
        table = self.w["bert"]["embeddings"]["word_embeddings"]["weight"]
        dtype = xp.float16 if table.dtype == xp.float16 else xp.float32  # bf16 runs on float32 arrays (precision.py)
        cache = new_cache(self.config, R, T + self.max_new_tokens, dtype, xp) if self.use_cache else None
        positions = generation_position_ids(self.prompt_mask)
        return self._logits(self.prompt_ids, BlipState(cache, self.prompt_ids, self.prompt_mask, positions))

    def step(self, next_ids, state):  # [R] -> logits [R, V] float32, state
        xp = namespace(state.ids)
        new_ids = next_ids[:, None].astype(state.ids.dtype)  # [R, 1]
        mask = xp.concat([state.attention_mask, xp.ones_like(state.attention_mask[:, :1])], axis=1)  # [R, S + 1]
        positions = xp.concat([state.positions, state.positions[:, -1:] + 1], axis=1)
        return self._logits(new_ids, BlipState(state.cache, xp.concat([state.ids, new_ids], axis=1), mask, positions))

    # The context's keys and values stay: beam search moves a row only within its input's group
    # of beams (loops.py), whose rows all read the same image or question.
    def reorder(self, state, rows):  # rows [R]: the old row each new row continues
        cache = state.cache.reorder(rows) if state.cache is not None else None
        return BlipState(cache, state.ids[rows], state.attention_mask[rows], state.positions[rows])

    def _logits(self, new_ids, state):
        xp = namespace(new_ids)
        if state.cache is not None:
            ids, positions = new_ids, state.positions[:, -new_ids.shape[1]:]
        else:  # without a cache: all again
            ids, positions = state.ids, state.positions
        hidden = text_decoder(ids, positions, state.attention_mask, self.context, self.w["bert"], self.config,
                              state.cache)
        return lm_head(hidden[:, -1:], self.w["cls"], self.config)[:, 0].astype(xp.float32), state  # [R, V]
