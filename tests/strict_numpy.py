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
                   np.left_shift, np.right_shift,
                   np.square, np.sqrt, np.reciprocal}  # NumPy's fast paths for x ** 2, x ** 0.5, x ** -1
_inside_namespace = [0]


@contextlib.contextmanager
def _allowed():
    _inside_namespace[0] += 1
    try:
        yield
    finally:
        _inside_namespace[0] -= 1


def _wrap(result, cls=None):
    cls = cls or StrictArray
    if isinstance(result, np.ndarray) and not isinstance(result, cls):
        return result.view(cls)
    if isinstance(result, np.generic):  # xp.all(x) is a 0-d array in other libraries, not a host scalar
        return np.asarray(result).view(cls)
    if isinstance(result, tuple):
        return tuple(_wrap(r, cls) for r in result)
    if isinstance(result, list):
        return [_wrap(r, cls) for r in result]
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
        return _wrap(getattr(ufunc, method)(*inputs, **kwargs), type(self))


# Functions NumPy runs for array methods (x.reshape, x.transpose, x.repeat, ...): methods exist on
# CuPy arrays too, so they are allowed.
ARRAY_METHODS = {"reshape", "transpose", "swapaxes", "repeat", "take", "sum", "mean", "max", "min", "argmax",
                 "any", "all", "cumsum", "astype", "copy", "squeeze", "ravel", "round", "clip", "prod"}


class _Namespace:
    """`strict.<name>` is NumPy's function, marked allowed, returning StrictArrays (or `cls`)."""

    def __init__(self, cls=None):
        self._cls = cls

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value

        @functools.wraps(value)
        def call(*args, **kwargs):
            with _allowed():
                return _wrap(value(*args, **kwargs), self._cls)
        return call


strict = _Namespace()


def to_strict(tree, cls=None):
    """Every array in a nested weights structure (dicts and lists) as a StrictArray (or `cls`)."""
    if isinstance(tree, dict):
        return {k: to_strict(v, cls) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_strict(v, cls) for v in tree]
    return np.ascontiguousarray(tree).view(cls or StrictArray)


# ---------------------------------------------------------------------------------------------
# A pretend GPU: arrays that live "on a device", so that every copy to the host can be counted.

class DeviceArray(StrictArray):
    """A StrictArray that behaves like a CuPy array towards the host: `get()` is the explicit
    copy, and bool(), int(), float(), .item(), .tolist() are implicit ones (each a device sync
    on a GPU). All of them are counted in `host_transfers`."""
    host_transfers = [0]

    def __array_namespace__(self, api_version=None):
        return fake_device

    def _transfer(self):
        DeviceArray.host_transfers[0] += 1
        return np.asarray(self)

    def get(self):
        return self._transfer()

    def __bool__(self):
        return bool(self._transfer())

    def __int__(self):
        return int(self._transfer())

    def __float__(self):
        return float(self._transfer())

    def __index__(self):
        return int(self._transfer())

    def item(self, *args):
        return self._transfer().item(*args)

    def tolist(self):
        return self._transfer().tolist()


class _FakeRandom:
    """`xp.random` of the pretend device: default_rng gives a generator of device arrays."""

    class Generator:
        def __init__(self, seed):
            self._rng = np.random.default_rng(seed)

        def standard_exponential(self, size=None):
            return self._rng.standard_exponential(size=size).view(DeviceArray)

    def default_rng(self, seed=None):
        return self.Generator(seed)


class _FakeDevice(_Namespace):
    __name__ = "fakedevice"  # not "numpy": the model takes its device paths
    random = _FakeRandom()


fake_device = _FakeDevice(DeviceArray)
