"""Tiny random BLIP-2 models built with transformers: the reference the tests compare against.

`tiny_config(**changes)` gives a `Blip2Config` small enough to run in milliseconds but with
odd widths and head counts, so that a transposed weight or a wrong head split cannot pass by
accident (every width differs from every other).
"""

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

VOCAB_SIZE = 320
IMAGE_TOKEN = VOCAB_SIZE - 1  # the tiny tokenizer's last id is <image>, as in the real one
EOS_TOKEN = 10  # stands in for "\n" (50118 in the real checkpoint)


def tiny_config(vision=None, qformer=None, text=None, num_query_tokens=5):
    vision_config = dict(hidden_size=40, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=30, patch_size=6, layer_norm_eps=1e-6)
    qformer_config = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=50,
                          cross_attention_frequency=2)
    text_config = dict(model_type="opt", vocab_size=VOCAB_SIZE, hidden_size=36, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=44, max_position_embeddings=96, eos_token_id=EOS_TOKEN)
    return Blip2Config(vision_config=vision_config | (vision or {}), qformer_config=qformer_config | (qformer or {}),
                       text_config=text_config | (text or {}), num_query_tokens=num_query_tokens,
                       image_token_index=IMAGE_TOKEN)


def tiny_model(config=None, seed=0):
    """A random Blip2ForConditionalGeneration in fp32, eval mode, eager attention.

    transformers initialises some tensors to zeros or ones (biases, layer norms, the K bias);
    every parameter is re-drawn here so that each one matters to the output."""
    torch.manual_seed(seed)
    return redrawn(Blip2ForConditionalGeneration(config or tiny_config()))


def redrawn(model):
    """`model` in eval mode with eager attention and every parameter drawn anew: norm scales near
    1, everything else N(0, 0.2^2) (the torch seed is the caller's)."""
    model.eval().config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


# BLIP-2 with Flan-T5, tiny: the same vision and Q-Former, a T5 whose every width differs
# (5 heads x d_kv 7 = 35 != d_model 36: T5 allows an inner width of its own, and so must we),
# 2 encoder and 2 decoder layers (transformers' generate sizes its cache by the encoder's count,
# so different counts fail there; tests/test_t5.py checks them against its own cache), few
# relative-position buckets so that short prompts already reach the logarithmic ones.
T5_VOCAB_SIZE = 160
T5_IMAGE_TOKEN = T5_VOCAB_SIZE - 1  # <image> is the last id, as 32100 is in blip2-flan-t5-xl
T5_EOS, T5_PAD = 1, 0


def tiny_t5_config(vision=None, qformer=None, text=None, num_query_tokens=5):
    text_config = dict(model_type="t5", vocab_size=T5_VOCAB_SIZE, d_model=36, d_kv=7, d_ff=29, num_layers=2,
                       num_decoder_layers=2, num_heads=5, feed_forward_proj="gated-gelu",
                       relative_attention_num_buckets=8, relative_attention_max_distance=20,
                       tie_word_embeddings=False, bos_token_id=T5_EOS, eos_token_id=T5_EOS, pad_token_id=T5_PAD,
                       decoder_start_token_id=T5_PAD)
    config = tiny_config(vision, qformer, num_query_tokens=num_query_tokens)
    return Blip2Config(vision_config=config.vision_config.to_dict(), qformer_config=config.qformer_config.to_dict(),
                       text_config=text_config | (text or {}), num_query_tokens=num_query_tokens,
                       image_token_index=T5_IMAGE_TOKEN)


# BLIP, tiny: BlipForConditionalGeneration and BlipForQuestionAnswering share one config. The
# vocabulary is the tiny BERT tokenizer's ids (miniblip2.testing.tiny_tokenizer, [PAD] 0, [CLS] 2,
# [SEP] 3, and [DEC] as its last id), then one more row, as BLIP's 30524 rows are BERT's 30522,
# [DEC] and [ENC]. Every width differs: vision 40 (4 heads of 10), text 36 (4 heads of 9),
# feed-forward 37 and 44; the text's cross-attention reads the vision width (40). BLIP's VQA
# decoder reads the question's encoding with weights sized for the image, so there the two
# widths must be equal (TINY_VQA_VISION: 36, in 6 heads of 6).
BLIP_VOCAB_SIZE = 120
BLIP_BOS, BLIP_SEP, BLIP_PAD, BLIP_EOS = BLIP_VOCAB_SIZE - 2, 3, 0, 2  # [DEC], [SEP], [PAD]; eos as BLIP's 2


TINY_VQA_VISION = dict(hidden_size=36, num_attention_heads=6)


def tiny_blip_config(vision=None, text=None):
    from transformers import BlipConfig
    vision_config = dict(hidden_size=40, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=30, patch_size=6, layer_norm_eps=1e-6)
    text_config = dict(vocab_size=BLIP_VOCAB_SIZE, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=44, max_position_embeddings=64, bos_token_id=BLIP_BOS,
                       sep_token_id=BLIP_SEP, pad_token_id=BLIP_PAD, eos_token_id=BLIP_EOS)
    return BlipConfig(vision_config=vision_config | (vision or {}), text_config=text_config | (text or {}))


def tiny_blip_model(config=None, question_answering=False, seed=0):
    """A random BlipForConditionalGeneration (or BlipForQuestionAnswering) in fp32, eval mode,
    eager attention, every parameter re-drawn as in tiny_model (the tied output layer with the
    word embeddings it shares)."""
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering
    torch.manual_seed(seed)
    cls = BlipForQuestionAnswering if question_answering else BlipForConditionalGeneration
    return redrawn(cls(config or tiny_blip_config()))


# BLIP's matching models, tiny (tests/test_blip_retrieval.py): tiny_blip_config's towers, with
# projections as wide as nothing else: ITM/ITC's image_text_hidden_size 14, BlipModel's
# projection_dim 22. BlipTextModel and BlipVisionModel are built on its text and vision configs
# (the text's cross-attention then reads 40 wide, the vision width BlipConfig gave it).
BLIP_MATCHING_WIDTHS = dict(image_text_hidden_size=14, projection_dim=22)


def tiny_blip_matching_config(vision=None, text=None):
    from transformers import BlipConfig
    base = tiny_blip_config(vision, text)
    return BlipConfig(vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(),
                      **BLIP_MATCHING_WIDTHS)


def tiny_blip_matching_model(cls, config, seed=0):
    """A random `cls` (BlipForImageTextRetrieval, BlipModel, BlipTextModel, BlipVisionModel) in
    fp32, eval mode, every parameter re-drawn as in tiny_model (logit_scale included)."""
    torch.manual_seed(seed)
    return redrawn(cls(config))
