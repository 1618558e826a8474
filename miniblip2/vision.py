"""The EVA ViT-g image encoder of BLIP-2 (`Blip2VisionModel` in transformers' modeling_blip_2.py).

pixels -> 14x14 patches -> linear patch embedding, a CLS token, learned positions
       -> 39 pre-LN transformer layers -> a final layer norm = `image_embeds`.

Legend: B batch, C colour channels (3), P patch side (14 px), N patches (16 x 16 = 256 at
224 px), T tokens (N + 1 = 257), D width (1408), H heads (16), F MLP width (6144).
`w` is `weights["vision_model"]`.
"""

import math
from dataclasses import dataclass

import numpy as np

from .errors import ImageError
from .nn import ACTIVATIONS, attention, layer_norm, linear, linear_shapes, merge_heads, namespace, norm_shapes
from .runtime.precision import widen
from .runtime.trace import PROBS, record


# Blip2VisionConfig (transformers 5.23 defaults: hub configs store only what differs).
@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6  # old full configs say 1e-5 explicitly; an explicit value wins
    qkv_bias: bool = True


# BlipVisionConfig: BLIP's ViT is the same model (BlipVisionModel has the layers and weight names
# of Blip2VisionModel) with other defaults: ViT-B/16 at 384 px, 577 tokens, layer norm eps 1e-5.
@dataclass(frozen=True)
class BlipVisionConfig(VisionConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 384
    patch_size: int = 16
    layer_norm_eps: float = 1e-5


# Every weight under `vision_model.` with its shape, from the config alone.
def expected_shapes(c):
    D, F, P = c.hidden_size, c.intermediate_size, c.patch_size
    shapes = {"embeddings.class_embedding": (1, 1, D),
              "embeddings.position_embedding": (1, (c.image_size // P) ** 2 + 1, D),
              "embeddings.patch_embedding.weight": (D, c.num_channels, P, P),
              "embeddings.patch_embedding.bias": (D,), **norm_shapes("post_layernorm", D)}
    for i in range(c.num_hidden_layers):
        layer = f"encoder.layers.{i}"
        shapes |= {**norm_shapes(f"{layer}.layer_norm1", D), **norm_shapes(f"{layer}.layer_norm2", D),
                   **linear_shapes(f"{layer}.self_attn.qkv", 3 * D, D, bias=c.qkv_bias),
                   **linear_shapes(f"{layer}.self_attn.projection", D, D),
                   **linear_shapes(f"{layer}.mlp.fc1", F, D), **linear_shapes(f"{layer}.mlp.fc2", D, F)}
    return shapes


# nn.Conv2d(C, D, kernel_size=P, stride=P): a convolution whose stride equals its kernel is one
# matrix product over non-overlapping patches. Pixels past the last whole patch are dropped.
def patch_embed(pixel_values, w, patch_size):  # [B, C, H, W] -> [B, N, D]
    B, C, height, width = pixel_values.shape
    gh, gw, P = height // patch_size, width // patch_size, patch_size
    x = pixel_values[:, :, :gh * P, :gw * P]
    x = x.reshape(B, C, gh, P, gw, P).transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, P, P]
    x = x.reshape(B, gh * gw, C * P * P)  # [B, 256, 588]: one row per patch, in raster order
    kernel = w["weight"].reshape(w["weight"].shape[0], -1)  # [D, C*P*P]
    return record(w, linear(x, {"weight": kernel, "bias": w["bias"]}))


# torch.nn.functional.interpolate(mode="bicubic", align_corners=False) along one axis, as an
# [n_out, n_in] matrix: Keys' cubic with a = -0.75, source indices clamped at the borders.
def bicubic_matrix(n_in, n_out):
    def cubic(t):  # weights of the 4 neighbours at distance 1+t, t, 1-t, 2-t
        a = -0.75
        near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1
        far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * (n_in / n_out) - 0.5
        base = math.floor(src)
        for offset, weight in zip(range(-1, 3), cubic(src - base)):
            matrix[i, min(max(base + offset, 0), n_in - 1)] += weight
    return matrix


# Blip2VisionEmbeddings.interpolate_pos_encoding: resample the learned square grid of patch
# positions to the image's own grid, so larger or non-square images can be encoded.
def interpolate_positions(position_embedding, gh, gw):  # [1, 1+n*n, D] -> [1, 1+gh*gw, D]
    xp = namespace(position_embedding)
    cls, grid = position_embedding[:, :1], position_embedding[0, 1:]
    n = math.isqrt(grid.shape[0])
    if n * n == gh * gw and gh == gw:
        return position_embedding
    grid = grid.reshape(n, n, -1).astype(xp.float32)  # [16, 16, D], in float32 as torch's half kernel
    rows = xp.asarray(bicubic_matrix(n, gh), dtype=grid.dtype)  # [gh, n]
    cols = xp.asarray(bicubic_matrix(n, gw), dtype=grid.dtype)  # [gw, n]
    grid = (rows @ grid.reshape(n, -1)).reshape(gh, n, -1)  # [gh, n, D]
    grid = (cols @ grid).reshape(1, gh * gw, -1)  # [1, gh*gw, D]: cols broadcasts over rows
    return xp.concat([cls, grid.astype(cls.dtype)], axis=1)


# Blip2VisionEmbeddings.forward: patches, a CLS token in front, learned positions added.
def vision_embeddings(pixel_values, w, config, interpolate_pos_encoding=False):  # [B, C, H, W] -> [B, T, D]
    xp = namespace(pixel_values)
    B, _, height, width = pixel_values.shape
    gh, gw = height // config.patch_size, width // config.patch_size
    patches = patch_embed(pixel_values, w["patch_embedding"], config.patch_size)  # [B, N, D]
    cls = xp.broadcast_to(widen(w["class_embedding"]), (B, 1, patches.shape[-1]))
    x = xp.concat([cls, patches], axis=1)  # [B, 257, D]
    positions = widen(w["position_embedding"])
    if interpolate_pos_encoding:
        positions = interpolate_positions(positions, gh, gw)
    elif x.shape[1] != positions.shape[1]:
        raise ImageError(
            f"pixel_values of {height}x{width} px make {x.shape[1] - 1} patches but the model was trained "
            f"on {config.image_size}x{config.image_size} px ({positions.shape[1] - 1} patches): resize the "
            "image with the processor, or pass interpolate_pos_encoding=True")
    return record(w, x + positions)


# Blip2Attention: one fused qkv projection. The stored K bias is all zeros (the original model had
# only q and v biases); it is used as stored.
def vit_attention(x, w, num_heads):  # [B, T, D] -> [B, T, D]
    B, T, D = x.shape
    K = D // num_heads
    qkv = linear(x, w["qkv"])  # [B, T, 3D]
    qkv = qkv.reshape(B, T, 3, num_heads, K).transpose(2, 0, 3, 1, 4)  # [3, B, H, T, K]
    out, probs = attention(qkv[0], qkv[1], qkv[2], scale=K ** -0.5)
    record(w, probs, PROBS)  # [B, H, T, T]: kept only when tracing (trace.py)
    return linear(merge_heads(out), w["projection"])


# Blip2MLP: fc1 -> exact GELU -> fc2.
def vit_mlp(x, w, act):  # [B, T, D] -> [B, T, F] -> [B, T, D]
    return linear(ACTIVATIONS[act](linear(x, w["fc1"])), w["fc2"])


# Blip2EncoderLayer: pre-LN attention and MLP, each added back to the residual stream.
def vit_layer(x, w, config):  # [B, T, D] -> [B, T, D]
    x = x + vit_attention(layer_norm(x, w["layer_norm1"], config.layer_norm_eps), w["self_attn"],
                          config.num_attention_heads)
    return x + vit_mlp(layer_norm(x, w["layer_norm2"], config.layer_norm_eps), w["mlp"], config.hidden_act)


# Blip2VisionModel.forward: last_hidden_state, the post layer norm applied to every token.
def vision_model(pixel_values, w, config, interpolate_pos_encoding=False):  # [B, C, H, W] -> [B, T, D]
    x = vision_embeddings(pixel_values, w["embeddings"], config, interpolate_pos_encoding)
    for layer in w["encoder"]["layers"]:
        x = record(layer, vit_layer(x, layer, config))
    return record(w["post_layernorm"], layer_norm(x, w["post_layernorm"], config.layer_norm_eps))
