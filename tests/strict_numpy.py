"""A stand-in for a non-NumPy array library, to catch model code that calls NumPy directly.

On the GPU the arrays are CuPy's, and `np.exp(cupy_array)` or `np.where(...)` fails or silently
copies to the host. Without a GPU, this module gives the same discipline on the CPU: a
`StrictArray` is a NumPy array whose `__array_namespace__` is `strict` (a proxy for NumPy that
marks its calls as allowed), and NumPy functions called on it directly raise `DirectNumPyCall`.
Python operators (+, *, @, <, ...) and array methods stay allowed: they are what every array
library supports. Model code that follows the `xp = namespace(x)` rule runs unchanged.
"""

import contextlib
import functools

import numpy as np


class DirectNumPyCall(TypeError):
    pass


# The ufuncs behind Python's operators and array methods (x + y, x @ y, x.sum(), x.max()...).
OPERATOR_UFUNCS = {np.add, np.subtract, np.multiply, np.true_divide, np.floor_divide, np.remainder, np.power,
                   np.matmul, np.negative, np.positive, np.absolute, np.invert, np.logical_not, np.equal,
                   np.not_equal, np.less, np.less_equal, np.greater, np.greater_equal, np.bitwise_and,
                   np.bitwise_or, np.bitwise_xor, np.maximum, np.minimum, np.logical_and, np.logical_or,
                   np.square, np.sqrt, np.reciprocal}  # NumPy's fast paths for x ** 2, x ** 0.5, x ** -1
_inside_namespace = [0]


@contextlib.contextmanager
def _allowed():
    _inside_namespace[0] += 1
    try:
        yield
    finally:
        _inside_namespace[0] -= 1


def _wrap(result):
    if isinstance(result, np.ndarray) and not isinstance(result, StrictArray):
        return result.view(StrictArray)
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, list):
        return [_wrap(r) for r in result]
    return result


class StrictArray(np.ndarray):
    def __array_namespace__(self, api_version=None):
        return strict

    def __array_function__(self, func, types, args, kwargs):
        if not _inside_namespace[0] and func.__module__.startswith("numpy") and func.__name__ not in ARRAY_METHODS:
            raise DirectNumPyCall(f"np.{func.__name__} called directly on a model array: use xp = namespace(x)")
        return super().__array_function__(func, types, args, kwargs)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if not _inside_namespace[0] and ufunc not in OPERATOR_UFUNCS:
            raise DirectNumPyCall(f"np.{ufunc.__name__} called directly on a model array: use xp = namespace(x)")
        inputs = [np.asarray(x) if isinstance(x, StrictArray) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, StrictArray) else o for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*inputs, **kwargs))


# Functions NumPy runs for array methods (x.reshape, x.transpose, x.repeat, ...): methods exist on
# CuPy arrays too, so they are allowed.
ARRAY_METHODS = {"reshape", "transpose", "swapaxes", "repeat", "take", "sum", "mean", "max", "min", "argmax",
                 "any", "all", "cumsum", "astype", "copy", "squeeze", "ravel", "round", "clip", "prod"}


class _Namespace:
    """`strict.<name>` is NumPy's function, marked allowed, returning StrictArrays."""

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value

        @functools.wraps(value)
        def call(*args, **kwargs):
            with _allowed():
                return _wrap(value(*args, **kwargs))
        return call


strict = _Namespace()


def to_strict(tree):
    """Every array in a nested weights structure (dicts and lists) as a StrictArray."""
    if isinstance(tree, dict):
        return {k: to_strict(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_strict(v) for v in tree]
    return np.ascontiguousarray(tree).view(StrictArray)
