"""The Q-Former of BLIP-2 (`Blip2QFormerModel` in transformers' modeling_blip_2.py).

32 learned query vectors read the image: each layer lets the queries attend to each other
(self-attention), every `cross_attention_frequency`-th layer (0, 2, 4, ... in blip2-opt-2.7b)
also lets them attend to the image tokens (cross-attention), then a feed-forward block.
BERT-style post-LN: each block's output is added to its input, then layer-normed.

Legend: B batch, Q queries (32), T image tokens (257), D width (768), E image width (1408),
H heads (12), F feed-forward width (3072). `w` is `weights["qformer"]`.
"""

from .nn import ACTIVATIONS, attention, layer_norm, linear, merge_heads, namespace, split_heads
from .runtime.trace import PROBS, record


# Blip2QFormerMultiHeadAttention: queries from `x`, keys and values from `context`
# (`x` itself for self-attention, the image for cross-attention). No mask: the image
# attention mask is all ones and there is no text.
def qformer_attention(x, context, w, num_heads):  # [B, Q, D], [B, S, D or E] -> [B, Q, D]
    q = split_heads(linear(x, w["query"]), num_heads)  # [B, H, Q, K]
    k = split_heads(linear(context, w["key"]), num_heads)  # [B, H, S, K]
    v = split_heads(linear(context, w["value"]), num_heads)
    out, probs = attention(q, k, v, scale=q.shape[-1] ** -0.5)
    record(w, probs, PROBS)  # [B, H, Q, S]: kept only when tracing (trace.py)
    return merge_heads(out)


# Blip2QFormerAttention + Blip2QFormerSelfOutput: attention, dense, then LayerNorm(out + x).
def qformer_attention_block(x, context, w, config):  # [B, Q, D] -> [B, Q, D]
    out = qformer_attention(x, context, w["attention"], config.num_attention_heads)
    return record(w, layer_norm(linear(out, w["output"]["dense"]) + x, w["output"]["LayerNorm"], config.layer_norm_eps))


# Blip2QFormerLayer.feed_forward_chunk_query: the queries have their own FFN weights
# (`intermediate_query`, `output_query`); the text FFN is unused when captioning.
def qformer_ffn(x, w, config):  # [B, Q, D] -> [B, Q, F] -> [B, Q, D]
    h = ACTIVATIONS[config.hidden_act](linear(x, w["intermediate_query"]["dense"]))
    out = linear(h, w["output_query"]["dense"])
    return layer_norm(out + x, w["output_query"]["LayerNorm"], config.layer_norm_eps)


# Blip2QFormerLayer.forward for queries only.
def qformer_layer(x, image_embeds, w, config):  # [B, Q, D], [B, T, E] -> [B, Q, D]
    x = qformer_attention_block(x, x, w["attention"], config)
    if "crossattention" in w:  # layers 0, 2, 4, ... when cross_attention_frequency is 2
        x = qformer_attention_block(x, image_embeds, w["crossattention"], config)
    return qformer_ffn(x, w, config)


# Blip2QFormerModel.forward(query_embeds=query_tokens, encoder_hidden_states=image_embeds):
# the queries are layer-normed first (`qformer.layernorm`, the BERT embeddings LayerNorm).
def qformer_model(query_tokens, image_embeds, w, config):  # [1, Q, D], [B, T, E] -> [B, Q, D]
    xp = namespace(image_embeds)
    x = record(w["layernorm"], layer_norm(query_tokens, w["layernorm"], config.layer_norm_eps))
    x = xp.broadcast_to(x, (image_embeds.shape[0], *x.shape[1:]))  # [B, Q, D]: the same queries per image
    for layer in w["encoder"]["layer"]:
        x = record(layer, qformer_layer(x, image_embeds, layer, config))
    return x
