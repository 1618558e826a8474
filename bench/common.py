"""What bench/cpu.py and bench/gpu.py share: the inputs, the stage clock, the report's file.

docs/BENCHMARKS.md holds one section per benchmark script ("## CPU", "## GPU"); each run
replaces only its own section, so the other machine's figures stay.
"""

import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "docs" / "example.png"
# "Question: what is in the picture? Answer:" as OPT token ids, after the 32 <image> ids and BOS.
PROMPT_IDS = [45641, 35, 99, 16, 11, 5, 2170, 116, 31652, 35]
BOS = 2


def bench_inputs(config):
    """The same image (docs/example.png, preprocessed as BLIP-2 does) and prompt ids for both."""
    from miniblip2.checkpoint.image import ImageConfig, preprocess
    size = config.vision.image_size  # blip2-opt-2.7b's preprocessor_config.json says 224 x 224
    pixel_values = preprocess([IMAGE], ImageConfig(height=size, width=size))  # [1, 3, 224, 224]
    ids = [config.image_token_index] * config.num_query_tokens + [BOS] + PROMPT_IDS
    input_ids = np.asarray([ids], dtype=np.int64)  # [1, 43]
    return pixel_values, input_ids, np.ones_like(input_ids)


class StageClock:
    """Seconds spent in named stages, from start/stop calls around them. `sync` waits for the
    device at each boundary (nothing to wait for on the CPU)."""

    def __init__(self, sync=lambda: None):
        self.sync, self.seconds, self.started = sync, {}, {}

    def start(self, name, *_):
        self.sync()
        self.started[name] = time.perf_counter()

    def stop(self, name, *_):
        self.sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.started.pop(name)

    def wrap(self, name, function):
        def timed(*args, **kwargs):
            self.start(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.stop(name)
        return timed

    def hook(self, name, module):  # a torch module's forward, timed as `name`
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop(name))


def write_section(path, heading, body):
    """Replace the `## {heading}` section (up to the next "## " heading) with `body`, or append it."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"## {heading}"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(text)
