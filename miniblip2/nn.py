"""The primitives every tower is built from: linear, layer norm, activations, softmax, attention.

Arrays in, arrays out. Each function finds its array namespace (`xp`, NumPy or CuPy) from its
input, so the same code runs wherever the weights live. In float16 and bfloat16 the products go
through `matmul` and the float32 parts through `in_float32` (see precision.py).

Legend: B batch, T tokens (queries), S keys, D width, H heads, K head width (D = H * K).
A weight `w` is the checkpoint's own dict for one module: `w["weight"]` in PyTorch's
[out, in] layout, `w["bias"]` when the module has one.
"""

import math
from dataclasses import dataclass

from .runtime.device import namespace, on_host
from .runtime.precision import in_float32, like_weight, matmul, widen


# torch.nn.Linear: y = x W^T + b, with W stored [out, in] exactly as in the file. `W.T` is a
# view: BLAS reads W as stored (a transposed operand), so the weight is never copied.
# The leading axes are merged into rows first: matmul on [B, T, in] runs one product per batch
# row, which reads W once per row (B beams decoding = B passes over 10 GB of weights).
def linear(x, w):  # [..., in] -> [..., out]
    out_features, in_features = w["weight"].shape
    y = matmul(x.reshape(-1, in_features), w["weight"].T).reshape(*x.shape[:-1], out_features)  # via [rows, out]
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


# T5LayerNorm (RMSNorm): divide by the root mean square, with no mean subtracted and no bias.
# The mean square is taken in float32; half inputs are rounded to the weight's dtype before the
# scale and the product is rounded again, the two roundings T5LayerNorm makes.
def rms_norm(x, w, eps):  # [..., D] -> [..., D]
    xp = namespace(x)
    x = x.astype(xp.float32, copy=False)
    variance = xp.mean(x * x, axis=-1, keepdims=True)
    normed = like_weight(x / xp.sqrt(variance + eps), w["weight"])
    return like_weight(widen(w["weight"]) * normed, w["weight"])


# torch.special.erfc for z >= 0: neither NumPy nor the array API has erf, so this is the
# Chebyshev fit of Numerical Recipes (erfcc), fractional error < 1.2e-7: float32 precision.
# Only z >= 0 is needed below, which spares the select (`where`) that negative z would need.
def erfc_nonnegative(z):
    xp = namespace(z)
    t = 1 / (1 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    return t * xp.exp(poly)


# nn.GELU() ("gelu"): the exact erf form x * Phi(x), written as relu(x) - |x| * Phi(-|x|), the
# same function (Phi(x) = 1 - Phi(-x)). Phi(-|x|) = erfc(|x| / sqrt 2) / 2 is tiny in the tails,
# computed with its relative precision, so the negative tail (where x * Phi(x) is tiny) keeps
# its digits, and no select between two branches is needed (NumPy's `where` costs more than
# the rest of GELU together on random signs).
@in_float32
def gelu(x):
    return in_row_blocks(_gelu, x)


def _gelu(x):
    xp = namespace(x)
    magnitude = xp.abs(x)
    return xp.maximum(x, 0) - 0.5 * magnitude * erfc_nonnegative(magnitude * (1 / math.sqrt(2)))


# Elementwise math on a large activation is limited by memory traffic on the CPU: each of GELU's
# ~30 operations on the vision MLP's [1, 257, 6144] writes a 6 MB temporary, past the cache.
# Run on blocks of rows (~64K numbers, 256 KB) every temporary stays in the L2 cache: 3x faster,
# the same numbers. A GPU is fastest with one kernel per operation over the whole array.
def in_row_blocks(f, x, block_size=1 << 16):  # f: [..., N] -> [..., N] elementwise
    xp = namespace(x)
    if not on_host(xp) or x.size <= block_size:
        return f(x)
    rows = x.reshape(-1, x.shape[-1])  # [R, N]
    step = max(1, block_size // rows.shape[1])
    return xp.concat([f(rows[i:i + step]) for i in range(0, rows.shape[0], step)]).reshape(x.shape)


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


# torch.softmax, with the max subtracted first so exp never overflows. The exp and the division
# work in place on the one new array: attention's [B, 12, 577, 577] scores in BLIP's ViT take 30%
# less time than with a new array per step (the same numbers, bit for bit).
@in_float32
def softmax(x, axis=-1):
    xp = namespace(x)
    e = x - xp.max(x, axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


# eager_attention_forward in transformers: softmax(q k^T * scale + mask) v.
# `mask` is additive ([B, 1, T, S], 0 or a large negative number) or None. The mask is added in
# float32: in float16 a score plus -65504 can round to -inf, and a padding row of only -inf
# would give NaN. The probabilities are rounded back to q's
# dtype before the product with v, as `softmax(..., dtype=float32).to(query.dtype)` does.
def attention(q, k, v, scale, mask=None):  # [B, H, T, K], [B, H, S, K] x2 -> [B, H, T, K], [B, H, T, S]
    xp = namespace(q)
    scores = matmul(q, k.swapaxes(-1, -2))  # [B, H, T, S]
    scores *= scale  # in place: one array of T x S scores a head is enough
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


# The weights `linear` and `layer_norm` read, as {checkpoint name: shape}: what a tower lists in
# its `expected_shapes` so that loading can check every key before the first product.
def linear_shapes(prefix, n_out, n_in, bias=True):
    return {f"{prefix}.weight": (n_out, n_in)} | ({f"{prefix}.bias": (n_out,)} if bias else {})


def norm_shapes(prefix, n, bias=True):
    return {f"{prefix}.weight": (n,)} | ({f"{prefix}.bias": (n,)} if bias else {})


# DynamicCache, preallocated: one [B, H, capacity, K] buffer per layer for keys and for values,
# filled up to `length`. Every decoder (OPT, T5's, BLIP's) caches its self-attention this way.
@dataclass
class KVCache:
    keys: list
    values: list
    length: int = 0

    @classmethod
    def zeros(cls, num_layers, shape, dtype, xp):  # shape [B, H, capacity, K]
        return cls([xp.zeros(shape, dtype=dtype) for _ in range(num_layers)],
                   [xp.zeros(shape, dtype=dtype) for _ in range(num_layers)])

    @property
    def capacity(self):
        return self.keys[0].shape[2]

    # The new tokens' keys and values written at the end (in place, no copy of the past), and
    # every key and value so far for the queries to read. The caller advances `length` once
    # all layers have run.
    def add(self, layer_index, k, v):  # [B, H, T, K] x2 -> [B, H, S, K] x2
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer_index][:, :, start:end] = k
        self.values[layer_index][:, :, start:end] = v
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]

    # Cache.reorder_cache, for beam search: row i of the new cache is row rows[i] of the old one,
    # so each surviving beam keeps the keys and values of the beam it extends.
    def reorder(self, rows):  # [R] indices into the cache's rows
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.length)
