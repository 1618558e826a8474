"""Half precision the way transformers runs it, in one place: float32, float16 or bfloat16.

The model computes in the dtype its weights were loaded in (`load(..., dtype=...)`):

- float32: everything float32, the default (the parity tests hold it to 1e-4 of PyTorch).
- float16: weights and activations are float16 arrays, as in PyTorch's fp16 model:
    * a matrix product multiplies float16 and accumulates in float32, rounding once at the end
      (cuBLAS's half GEMM and torch's CPU one): `matmul`;
    * layer norm, softmax and GELU compute in float32 and round their output once (torch's
      kernels upcast half inputs to float32, their "opmath" type): `in_float32`, `layer_norm`;
    * everything else (residual adds, scaling, the OPT mask) is an elementwise float16 op,
      which NumPy and CuPy, like torch, compute in float32 and round: nothing to do;
    * the Q-Former and `query_tokens` stay float32 (Blip2's `_keep_in_fp32_modules`, which
      transformers applies for float16 only): its input is cast up and its output back down.
- bfloat16: neither NumPy nor CuPy has bfloat16. Weights stay 16-bit, as the raw bf16 bits in
  uint16 (half the memory of float32), and are widened to float32 where they are used
  (`widen`: exact, bf16 is float32 with a shorter mantissa). Activations are float32 arrays
  holding bf16 values: a matrix product rounds its input and its output to bf16, and so does
  layer norm. The product of two bf16 numbers is exact in float32, so a float32 GEMM on
  bf16-rounded inputs, rounded to bf16, is what a bf16 GEMM with float32 accumulation gives
  (up to summation order). Elementwise ops between layers (residual adds, attention scores)
  are not rounded; that keeps this file the only one that knows about bf16, and costs a few
  bf16 ulps against torch (tests/test_precision.py states how many). As in transformers,
  nothing is kept in float32 for bfloat16: the Q-Former runs in bf16 too.

Legend: D width. A "weight" is a stored array (float32, float16, or uint16 bf16 bits).
"""

import functools

import numpy as np

from ..checkpoint.safetensors import bf16_to_float32, float32_to_bf16, is_bf16
from ..errors import CheckpointError, DeviceError
from .device import namespace, on_host

DTYPES = ("float32", "float16", "bfloat16")


def is_bf16_bits(w):
    """A stored weight kept as bf16 bits (uint16): on the device the NumPy dtype tag is gone."""
    return w.dtype.kind == "u" and w.dtype.itemsize == 2


# torch.Tensor.float() on bfloat16: the 16 bits become the top half of a float32.
def widen(w):  # stored weight -> the array to compute with (float32 for bf16 bits, else itself)
    if not is_bf16_bits(w):
        return w
    xp = namespace(w)
    return (w.astype(xp.uint32) << 16).view(xp.float32)


# torch.Tensor.to(torch.bfloat16), round to nearest even, kept as float32 values.
def round_bf16(x):  # float32 [...] -> float32 [...] holding bf16 values
    xp = namespace(x)
    bits = x.view(xp.uint32)
    # Add just under half an ulp, plus one when the kept part is odd (ties to even), then cut.
    # Only NaN bit patterns can carry out of 32 bits; they are kept as they are.
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(xp.float32)
    return xp.where(xp.isnan(x), x, rounded)


def like_weight(x, w):  # an activation in the dtype weight `w` computes in
    if is_bf16_bits(w):
        return round_bf16(x.astype(namespace(x).float32, copy=False))
    return x.astype(w.dtype, copy=False)


# A matrix product as torch's half GEMMs compute it: 16-bit inputs, float32 accumulation, the
# result rounded once. CuPy's float16 matmul does exactly this (cuBLAS, float32 compute type);
# NumPy's float16 matmul accumulates in float32 too but has no BLAS, so on the host the inputs
# are widened and the float32 BLAS result rounded, which is the same number, much faster.
def matmul(a, b):  # [..., M, K] @ [..., K, N] -> [..., M, N]
    xp = namespace(a)
    if is_bf16_bits(b):
        return round_bf16(round_bf16(a.astype(xp.float32, copy=False)) @ widen(b))
    if a.dtype == xp.float16 and on_host(xp):
        return (a.astype(xp.float32) @ b.astype(xp.float32)).astype(xp.float16)
    return a @ b


# torch's "opmath": elementwise kernels (softmax, GELU, ...) read half inputs as float32,
# compute in float32 and round the result once. float32 inputs pass through unchanged.
def in_float32(fn):
    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        xp = namespace(x)
        return fn(x.astype(xp.float32, copy=False), *args, **kwargs).astype(x.dtype, copy=False)
    return run


# ---------------------------------------------------------------------------------------------
# Loading: the checkpoint's tensors (as stored) in the dtype each module computes in.

def check_dtype(dtype):
    """'float32' | 'float16' | 'bfloat16' (a NumPy dtype or torch-like name works too)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES and dtype is not None:  # np.dtype(None) is float64: say None instead
        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError, SyntaxError):  # np.dtype("(") raises SyntaxError
            pass
    if name not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not one miniblip2 computes in; choose one of "
                          f"{', '.join(DTYPES)}")
    return name


# PreTrainedModel.from_pretrained(dtype=...) with _keep_in_fp32_modules: floating tensors become
# `dtype` (bf16 as uint16 bits) except those whose names start with one of `keep_float32` (the
# family's list; transformers applies it for float16 only). Host NumPy, once, at load. float32
# tensors loaded as float32 are returned as they are: memory maps stay memory maps.
def cast_weights(flat, dtype, keep_float32=()):  # {name: array as stored} -> {name: array to compute with}
    keep = tuple(keep_float32)
    return {name: _cast(name, array, "float32" if name.startswith(keep) else dtype)
            for name, array in flat.items()}


def _cast(name, array, dtype):
    if not (array.dtype.kind == "f" or is_bf16(array)):
        return array
    if dtype == "bfloat16":
        return array if is_bf16(array) else float32_to_bf16(array)
    wide = bf16_to_float32(array) if is_bf16(array) else array
    if wide.dtype == dtype:
        return wide
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    if not np.isfinite(narrow).all() and np.isfinite(wide).all():  # float16 tops out at 65504
        raise CheckpointError(f"tensor {name!r} has values beyond the {dtype} range (largest magnitude "
                              f"{np.abs(wide).max():.4g}); load it with dtype='float32' or 'bfloat16'")
    return narrow
