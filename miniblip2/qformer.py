"""The Q-Former of BLIP-2 (`Blip2QFormerModel` in transformers' modeling_blip_2.py), a BERT
(bert.py) whose rows are 32 learned query vectors, text tokens, or both:

- queries alone (captioning, image features): the queries attend to each other (self-attention),
  every `cross_attention_frequency`-th layer (0, 2, 4, ... in blip2-opt-2.7b) also to the image
  tokens (cross-attention), then a feed-forward block with the queries' own weights.
- text alone (text features, the text side of ITC): plain BERT, the text's own feed-forward
  weights (`intermediate`, `output`), no cross-attention.
- queries then text in one sequence (image-text matching): one self-attention over all rows
  under the padding mask, so queries and text read each other; then only the query rows go
  through cross-attention and the query feed-forward, the text rows through the text one.

BERT-style post-LN: each block's output is added to its input, then layer-normed.

Legend: B batch, Q queries (32), L text tokens (12 in "[CLS] a photo of ... [SEP]"), N rows
(Q, L or Q + L), T image tokens (257), D width (768), E image width (1408), H heads (12),
F feed-forward width (3072), V vocabulary (30523 in blip2-itm-vit-g), P text positions (512).
`w` is `weights["qformer"]`.
"""

from dataclasses import dataclass

from .bert import attention_block, attention_shapes, embedding_shapes, feed_forward, feed_forward_shapes, padding_mask
from .nn import layer_norm, namespace, norm_shapes
from .runtime.trace import record


# Blip2QFormerConfig (transformers 5.23 defaults).
@dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # always the vision width: Blip2Config forces it
    use_qformer_text_input: bool = False  # the text FFN exists (blip2-itm-vit-g: true)
    vocab_size: int = 30522  # blip2-itm-vit-g: 30523, BERT's plus [DEC]
    max_position_embeddings: int = 512
    pad_token_id: int | None = 0


# Every weight under `qformer.` with its shape. The text embeddings are not the Q-Former's: the
# models that read text hold them beside it, as `embeddings.` (see text_embedding_shapes).
def expected_shapes(c):
    D, F = c.hidden_size, c.intermediate_size
    shapes = norm_shapes("layernorm", D)
    for i in range(c.num_hidden_layers):
        layer = f"encoder.layer.{i}"
        shapes |= attention_shapes(f"{layer}.attention", D, D)
        if i % c.cross_attention_frequency == 0:
            shapes |= attention_shapes(f"{layer}.crossattention", D, c.encoder_hidden_size)
        shapes |= feed_forward_shapes(f"{layer}.intermediate_query", f"{layer}.output_query", D, F)
        if c.use_qformer_text_input:
            shapes |= feed_forward_shapes(f"{layer}.intermediate", f"{layer}.output", D, F)
    return shapes


# Blip2TextEmbeddings' weights (under `embeddings.`): [V, D] words, [P, D] positions.
def text_embedding_shapes(c):
    return embedding_shapes(c.vocab_size, c.max_position_embeddings, c.hidden_size)


# Blip2QFormerLayer.forward. The first `query_length` rows are queries (all rows when None; none
# when 0, the text alone); `mask` is the additive padding mask over all rows. The image mask is
# all ones in BLIP-2, so cross-attention needs none.
def qformer_layer(x, image_embeds, w, config, mask=None, query_length=None):  # [B, N, D], [B, T, E] -> [B, N, D]
    xp = namespace(x)
    Q = x.shape[1] if query_length is None else query_length
    x = attention_block(x, x, w["attention"], config, mask)  # queries and text read each other
    if Q == 0:
        return feed_forward(x, w["intermediate"], w["output"], config)
    queries = x[:, :Q]  # [B, Q, D]
    if "crossattention" in w:  # layers 0, 2, 4, ... when cross_attention_frequency is 2
        queries = attention_block(queries, image_embeds, w["crossattention"], config)
    queries = feed_forward(queries, w["intermediate_query"], w["output_query"], config)
    if x.shape[1] == Q:
        return queries
    text = feed_forward(x[:, Q:], w["intermediate"], w["output"], config)  # [B, L, D]
    return xp.concat([queries, text], axis=1)  # [B, Q + L, D]


# Blip2QFormerModel.forward(query_embeds, query_length, attention_mask, encoder_hidden_states):
# the rows are layer-normed first (`qformer.layernorm`, the BERT embeddings LayerNorm), then the
# layers. `query_embeds` [1, Q, D] (the query tokens alone) serves every image of the batch.
def qformer_model(query_embeds, image_embeds, w, config, attention_mask=None, query_length=None):
    # [1 or B, N, D], [B, T, E] or None, [B, N] or None -> [B, N, D]
    xp = namespace(query_embeds)
    x = record(w["layernorm"], layer_norm(query_embeds, w["layernorm"], config.layer_norm_eps))
    if image_embeds is not None and x.shape[0] == 1:
        x = xp.broadcast_to(x, (image_embeds.shape[0], *x.shape[1:]))  # [B, Q, D]: the same queries per image
    mask = None if attention_mask is None else padding_mask(attention_mask)  # [B, 1, 1, N]
    for layer in w["encoder"]["layer"]:
        x = record(layer, qformer_layer(x, image_embeds, layer, config, mask, query_length))
    return x
