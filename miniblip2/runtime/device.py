"""Where the arrays live: NumPy on the CPU, CuPy on an NVIDIA GPU.

The model math never names a library: each function asks its input for its namespace
(`xp = namespace(x)`), so moving the weights moves the computation. This module is the one place
that knows about devices: it picks the array library for "cpu" or "cuda" (importing CuPy only
then), moves the nested weights there once, and brings results back to NumPy at the API edge.

    xp = array_module("cuda")            # cupy, or a DeviceError that says what to install
    weights = to_device(weights, xp)     # every array copied to the GPU once
    to_numpy(logits)                     # the one explicit transfer back
"""

import os
import sys

import numpy as np

from ..errors import DeviceError

DEVICES = ("cpu", "cuda")
GPU_HELP = ("install CuPy for your CUDA version: pip install 'miniblip2[gpu]' (cupy-cuda12x, CUDA 12.x); "
            "for CUDA 11.x pip install cupy-cuda11x, for CUDA 13.x pip install cupy-cuda13x. "
            "`nvidia-smi` shows the CUDA version the driver supports")


# The array API's `x.__array_namespace__()`. CuPy arrays do not have it (CuPy 14): their
# module is their namespace, as array_api_compat also finds it.
def namespace(x):
    if hasattr(x, "__array_namespace__"):
        return x.__array_namespace__()
    return sys.modules[type(x).__module__.split(".")[0]]


def on_host(xp):
    """True for NumPy (and the tests' NumPy stand-ins): arrays already in host memory."""
    return getattr(xp, "__name__", None) == "numpy"


def array_module(device):
    """numpy for "cpu"; cupy for "cuda", checked to import and to see a GPU."""
    if device not in DEVICES:
        raise DeviceError(f"device {device!r} is not one of {', '.join(map(repr, DEVICES))}")
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError as err:
        raise DeviceError(f"device='cuda' needs CuPy, which is not installed ({err}): {GPU_HELP}") from err
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count > 0:
            cupy.zeros(1).sum()  # loads the CUDA libraries: a wrong wheel fails here, not mid-model
    except Exception as err:  # CUDARuntimeError, a missing libcudart or libcublas, ...
        raise DeviceError(f"device='cuda': CuPy is installed but cannot use a GPU ({type(err).__name__}: "
                          f"{err}). Check `nvidia-smi`, and that the CuPy wheel matches the CUDA version: "
                          f"{GPU_HELP}") from err
    if count == 0:
        raise DeviceError("device='cuda': CuPy sees no GPU (`nvidia-smi` should list one, and "
                          "CUDA_VISIBLE_DEVICES must not hide it); use device='cpu'")
    return cupy


def to_device(tree, xp):
    """Every array of a nested weights structure (dicts, lists) as an `xp` array, copied once.
    Arrays that appear twice (OPT's tied lm_head and embed_tokens) stay one array."""
    copies = {}

    def move(node):
        if isinstance(node, dict):
            return {key: move(value) for key, value in node.items()}
        if isinstance(node, list):
            return [move(value) for value in node]
        if id(node) not in copies:  # the BF16 tag (dtype metadata) stays behind: uint16 on the device
            copies[id(node)] = (node, xp.asarray(node.view(node.dtype.str)))  # source kept: its id stays unique
        return copies[id(node)][1]

    return move(tree)


def to_numpy(x):
    """A NumPy array of `x`, wherever it lives: the explicit device -> host copy (CuPy's .get())."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


# A random generator on the device, for sampling: the noise is drawn where the scores are, so
# no [rows, vocabulary] array crosses to the GPU each step. It is seeded from the host generator
# (itself seeded by `seed=`), so a seed gives the same tokens every run on the same device; on
# the CPU the host generator itself is used, as it always was.
def device_generator(rng, xp):
    if on_host(xp):
        return rng
    return xp.random.default_rng(int(rng.integers(2 ** 63)))


# The memory a new allocation can still take, in bytes, for refusing requests that cannot fit:
# on the host Linux's MemAvailable (free memory plus reclaimable page cache), else the physical
# total; on a GPU the device's free memory plus what CuPy's pool holds unused.
def memory_available(xp):
    if not on_host(xp) and hasattr(xp, "cuda"):
        free, _ = xp.cuda.runtime.memGetInfo()
        return free + xp.get_default_memory_pool().free_bytes()
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): do not refuse on a guess
        return float("inf")
