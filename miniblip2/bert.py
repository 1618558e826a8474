"""BERT's post-LN transformer pieces (transformers' modeling_bert.py), shared by every BERT-style
tower: the Q-Former of BLIP-2 (qformer.py) and, later, BLIP's text encoder and decoder.

    text_embeddings    word + learned absolute position            (Blip2TextEmbeddings)
    padding_mask       [B, S] of 0/1 -> additive [B, 1, 1, S]      (create_bidirectional_mask)
    attention_block    attention, dense, LayerNorm(out + x)        (BertAttention = SelfAttention + SelfOutput)
    feed_forward       dense, activation, dense, LayerNorm(out + x) (BertIntermediate + BertOutput)

Post-LN: each block's output is added to its input and then layer-normed, unlike the pre-LN ViT.
The same attention block does self-attention (`context` is `x`) and cross-attention (`context`
is the image): only where the keys and values come from differs.

Legend: B batch, T rows (text tokens, or 32 queries + text tokens in BLIP-2's matching), S keys
(T in self-attention, 257 image tokens in cross-attention), D width (768), E context width (1408,
the BLIP-2 ViT's), H heads (12), K head width (64), F feed-forward width (3072), V vocabulary
(30523), P positions (512). `config` is a BERT-style tower's config (qformer.QFormerConfig):
it has num_attention_heads, hidden_act and layer_norm_eps.
"""

from .nn import (ACTIVATIONS, attention, layer_norm, linear, linear_shapes, merge_heads, namespace, norm_shapes,
                 split_heads)
from .runtime.precision import like_weight, widen
from .runtime.trace import PROBS, record


# The weights of one attention block (`prefix` is e.g. "encoder.layer.0.crossattention"): query
# from the rows (D wide), key and value from the context (D for self-, E for cross-attention).
def attention_shapes(prefix, D, context_width):
    return {**linear_shapes(f"{prefix}.attention.query", D, D),
            **linear_shapes(f"{prefix}.attention.key", D, context_width),
            **linear_shapes(f"{prefix}.attention.value", D, context_width),
            **linear_shapes(f"{prefix}.output.dense", D, D), **norm_shapes(f"{prefix}.output.LayerNorm", D)}


# The weights of one feed-forward block, under the names the checkpoint gives its two halves
# (the Q-Former has two such blocks per layer: `intermediate_query`/`output_query` and `intermediate`/`output`).
def feed_forward_shapes(intermediate, output, D, F):
    return {**linear_shapes(f"{intermediate}.dense", F, D), **linear_shapes(f"{output}.dense", D, F),
            **norm_shapes(f"{output}.LayerNorm", D)}


def embedding_shapes(vocab_size, max_positions, D):
    return {"word_embeddings.weight": (vocab_size, D), "position_embeddings.weight": (max_positions, D)}


# Blip2TextEmbeddings.forward(input_ids): a learned vector per token plus one per position 0..T-1.
# No LayerNorm here: in BLIP-2 the Q-Former's `layernorm` normalises queries and text together.
# The sum is rounded to the table's dtype, as torch adds two float16 (bfloat16) embeddings.
def text_embeddings(input_ids, w):  # [B, T] ints -> [B, T, D]
    xp = namespace(input_ids)
    words = widen(w["word_embeddings"]["weight"][input_ids])  # [B, T, D]
    positions = widen(w["position_embeddings"]["weight"][xp.arange(input_ids.shape[1])])  # [T, D]: broadcasts over B
    return record(w, like_weight(words + positions, w["word_embeddings"]["weight"]))


# create_bidirectional_mask (BERT's extended attention mask): every row may attend to every key
# that is not padding, in both directions. Additive: 0 where seen, float32's most negative number
# where not (nn.attention adds it to float32 scores). No row is all padding, so no row is all -inf.
def padding_mask(attention_mask):  # [B, S] of 0/1 -> [B, 1, 1, S]: broadcasts over heads and rows
    xp = namespace(attention_mask)
    blocked = xp.asarray(xp.finfo(xp.float32).min, dtype=xp.float32)
    return xp.where(attention_mask[:, None, None, :] != 0, xp.asarray(0, dtype=xp.float32), blocked)


# Blip2QFormerMultiHeadAttention (BertSelfAttention): queries from `x`, keys and values from
# `context` (`x` itself for self-attention, the image for cross-attention), scaled by 1/sqrt(K).
def multi_head_attention(x, context, w, num_heads, mask=None):  # [B, T, D], [B, S, D or E] -> [B, T, D]
    q = split_heads(linear(x, w["query"]), num_heads)  # [B, H, T, K]
    k = split_heads(linear(context, w["key"]), num_heads)  # [B, H, S, K]
    v = split_heads(linear(context, w["value"]), num_heads)
    out, probs = attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
    record(w, probs, PROBS)  # [B, H, T, S]: kept only when tracing (trace.py)
    return merge_heads(out)


# Blip2QFormerAttention (BertAttention): attention, then BertSelfOutput's dense and LayerNorm(out + x).
def attention_block(x, context, w, config, mask=None):  # [B, T, D] -> [B, T, D]
    out = multi_head_attention(x, context, w["attention"], config.num_attention_heads, mask)
    return record(w, layer_norm(linear(out, w["output"]["dense"]) + x, w["output"]["LayerNorm"], config.layer_norm_eps))


# BertIntermediate + BertOutput: widen, activate, narrow, then LayerNorm(out + x).
def feed_forward(x, intermediate, output, config):  # [B, T, D] -> [B, T, F] -> [B, T, D]
    h = ACTIVATIONS[config.hidden_act](linear(x, intermediate["dense"]))
    return layer_norm(linear(h, output["dense"]) + x, output["LayerNorm"], config.layer_norm_eps)
