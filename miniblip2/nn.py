"""The primitives every tower is built from: linear, layer norm, activations, softmax, attention.

Arrays in, arrays out. Each function finds its array namespace (`xp`, NumPy or CuPy) from its
input, so the same code runs wherever the weights live. In float16 and bfloat16 the products go
through `matmul` and the float32 parts through `in_float32` (see precision.py).

Legend: B batch, T tokens (queries), S keys, D width, H heads, K head width (D = H * K).
A weight `w` is the checkpoint's own dict for one module: `w["weight"]` in PyTorch's
[out, in] layout, `w["bias"]` when the module has one.
"""

import math

from .device import namespace
from .precision import in_float32, like_weight, matmul, widen


# torch.nn.Linear: y = x W^T + b, with W stored [out, in] exactly as in the file.
def linear(x, w):  # [..., in] -> [..., out]
    y = matmul(x, w["weight"].T)
    if "bias" in w:
        y = y + widen(w["bias"])
    return y


# torch.nn.LayerNorm: normalise over the last axis with the biased variance, then scale and shift.
# Half inputs are normalised in float32 and the result rounded once, as torch's kernel does.
def layer_norm(x, w, eps):  # [..., D] -> [..., D]
    xp = namespace(x)
    x = x.astype(xp.float32, copy=False)
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return like_weight((x - mean) / xp.sqrt(var + eps) * widen(w["weight"]) + widen(w["bias"]), w["weight"])


# torch.special.erfc: neither NumPy nor the array API has erf, so this is the Chebyshev fit of
# Numerical Recipes (erfcc), fractional error < 1.2e-7 for every x: float32 precision.
def erfc(x):
    xp = namespace(x)
    z = xp.abs(x)
    t = 1 / (1 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    ans = t * xp.exp(poly)
    return xp.where(x >= 0, ans, 2 - ans)


# nn.GELU() ("gelu"): the exact erf form x * Phi(x). Written with erfc(-x / sqrt 2) so that the
# negative tail, where Phi(x) is tiny, keeps its relative precision.
@in_float32
def gelu(x):
    return 0.5 * x * erfc(-x * (1 / math.sqrt(2)))


# NewGELUActivation ("gelu_new", "gelu_pytorch_tanh"): the tanh approximation.
@in_float32
def gelu_tanh(x):
    xp = namespace(x)
    return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


# QuickGELUActivation.
@in_float32
def quick_gelu(x):
    return x * sigmoid(1.702 * x)


def sigmoid(x):
    xp = namespace(x)
    return 1 / (1 + xp.exp(-x))


@in_float32
def silu(x):
    return x * sigmoid(x)


def relu(x):
    xp = namespace(x)
    return xp.maximum(x, 0)


# transformers' ACT2FN, for the names config files use.
ACTIVATIONS = {"gelu": gelu, "relu": relu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
               "quick_gelu": quick_gelu, "silu": silu}


# torch.softmax, with the max subtracted first so exp never overflows.
@in_float32
def softmax(x, axis=-1):
    xp = namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


# eager_attention_forward in transformers: softmax(q k^T * scale + mask) v.
# `mask` is additive ([B, 1, T, S], 0 or a large negative number) or None. The mask is added in
# float32: in float16 a score plus -65504 can round to -inf, and a padding row of only -inf
# would give NaN. The probabilities are rounded back to q's
# dtype before the product with v, as `softmax(..., dtype=float32).to(query.dtype)` does.
def attention(q, k, v, scale, mask=None):  # [B, H, T, K], [B, H, S, K] x2 -> [B, H, T, K], [B, H, T, S]
    xp = namespace(q)
    scores = matmul(q, k.swapaxes(-1, -2)) * scale  # [B, H, T, S]
    if mask is not None:
        scores = scores.astype(xp.float32, copy=False) + mask
    probs = softmax(scores).astype(q.dtype, copy=False)
    return matmul(probs, v), probs


def split_heads(x, num_heads):  # [B, T, D] -> [B, H, T, K]
    B, T, D = x.shape
    return x.reshape(B, T, num_heads, D // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):  # [B, H, T, K] -> [B, T, D]
    B, H, T, K = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * K)
