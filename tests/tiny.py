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
    model = Blip2ForConditionalGeneration(config or tiny_config()).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model
