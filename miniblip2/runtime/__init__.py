"""Where and how the math runs: device.py (NumPy or CuPy), precision.py (float32, float16,
bfloat16), trace.py (every intermediate, for the notebooks and the parity tests)."""
