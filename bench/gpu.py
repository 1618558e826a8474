"""miniblip2 (CuPy) against transformers (PyTorch) on one NVIDIA GPU: blip2-opt-2.7b in float16.

    python bench/gpu.py                       # full size: 7.7 GB of random fp16 weights, written once
    python bench/gpu.py --layers 2 --reps 2   # a quick look: every tower cut to 2 layers

Random weights at the real shapes (the real config.json, `miniblip2.testing.random_checkpoint`'s preset)
are written once as fp16 safetensors shards and reused. Each implementation runs in its own
process on the same GPU (so its peak memory is its own) with the same image (docs/example.png,
preprocessed as BLIP-2 does) and prompt, in float16, transformers with eager attention. Each
captions with 20 new tokens forced (greedy, min_new_tokens = max_new_tokens = 20), once to warm
up (kernel compilation, cuBLAS heuristics, the memory pool), then `--reps` times; medians are
reported. Stages are timed inside one `generate` call the same way on both sides, the GPU
synchronised at each stage boundary: vision encoder, Q-Former + language projection (wrapped,
forward hooks in PyTorch); prefill and per-token decode by a streamer that notes when each
token reaches the host. Peak GPU memory is what each library's caching allocator reserved at
most (torch.cuda.max_memory_reserved; CuPy's pool keeps every block it ever needed, so its
total_bytes after the run is its high-water mark).

A full-size run replaces the "## GPU" section of docs/BENCHMARKS.md (the rest of the file is
kept), with the GPU's name and the date.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import PROMPT_IDS, StageClock, bench_inputs, write_section  # noqa: E402  (bench/common.py)

DEFAULT_WEIGHTS = REPO / "weights" / "blip2-opt-2.7b-random-fp16"
DOC = REPO / "docs" / "BENCHMARKS.md"
STAGES = ("load", "vision", "qformer", "prefill", "decode", "total", "peak_memory")


def ensure_weights(folder, layers):
    """The random fp16 checkpoint, written once (a few minutes at full size)."""
    from miniblip2.testing.random_checkpoint import write_random_checkpoint
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        print(f"writing random blip2-opt-2.7b weights (fp16) to {folder} ...", file=sys.stderr)
        write_random_checkpoint(folder, "blip2-opt-2.7b", layers=layers, dtype=np.float16)
    return folder


class Clock(StageClock):
    """Stage seconds, and the arrival time of each streamed token (transformers' put/end
    streamer protocol). `sync` waits for the GPU at each stage boundary."""

    def __init__(self, sync):
        super().__init__(sync)
        self.times = []

    def put(self, value):  # the ids are on the host already: the GPU work before them is done
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def run(self, generate):
        self.seconds, self.times = {}, []
        start = time.perf_counter()
        generate(self)
        total = time.perf_counter() - start
        prompt, first, last = self.times[0], self.times[1], self.times[-1]
        return {**self.seconds, "prefill": first - prompt, "decode": (last - first) / (len(self.times) - 2),
                "total": total, "new_tokens": len(self.times) - 1}


def measure(clock, generate, reps, load, peak_memory):
    clock.run(generate)  # warm-up
    runs = [clock.run(generate) for _ in range(reps)]
    return {"load": load, "runs": runs, "peak_memory": peak_memory()}


def run_miniblip2(folder, reps, tokens):
    import cupy

    import miniblip2
    start = time.perf_counter()
    model = miniblip2.load(folder, dtype="float16", device="cuda", progress=False)
    cupy.cuda.Device().synchronize()
    load = time.perf_counter() - start
    pixel_values, input_ids, attention_mask = bench_inputs(model.config)
    clock = Clock(cupy.cuda.Device().synchronize)
    model.vision = clock.wrap("vision", model.vision)
    model.qformer = clock.wrap("qformer", model.qformer)
    model.project = clock.wrap("qformer", model.project)  # the projection counts with the Q-Former

    def generate(streamer):
        model.generate(pixel_values, input_ids, attention_mask, max_new_tokens=tokens, min_new_tokens=tokens,
                       streamer=streamer)

    return measure(clock, generate, reps, load, lambda: cupy.get_default_memory_pool().total_bytes())


def run_transformers(folder, reps, tokens):
    import torch
    import transformers

    from miniblip2.blip2 import read_config
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float16, attn_implementation="eager").eval().to("cuda")
    torch.cuda.synchronize()
    load = time.perf_counter() - start
    pixel_values, input_ids, attention_mask = bench_inputs(read_config(folder))
    pixel_values = torch.from_numpy(pixel_values).to("cuda", torch.float16)
    input_ids, attention_mask = torch.from_numpy(input_ids).cuda(), torch.from_numpy(attention_mask).cuda()
    clock = Clock(torch.cuda.synchronize)
    for name, module in (("vision", model.vision_model), ("qformer", model.qformer),
                         ("qformer", model.language_projection)):
        clock.hook(name, module)

    def generate(streamer):
        with torch.inference_mode():
            model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                           max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                           streamer=streamer)

    return measure(clock, generate, reps, load, torch.cuda.max_memory_reserved)


def gpu_description():
    """'NVIDIA H100 80GB HBM3, driver 550.x, CUDA 12.4' from nvidia-smi, or CuPy's device name."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip().splitlines()[0]
        name, driver, memory = (part.strip() for part in out.split(","))
        return f"{name} ({memory}), driver {driver}"
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        import cupy
        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


def versions():
    import cupy
    import torch
    import transformers
    return f"CuPy {cupy.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}"


def run_child(kind, args):
    command = [sys.executable, __file__, "--child", kind, "--weights", str(args.folder), "--reps", str(args.reps),
               "--tokens", str(args.tokens)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench/gpu.py: the {kind} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(result, stage):
    if stage in ("load", "peak_memory"):
        return result[stage]
    return statistics.median(run[stage] for run in result["runs"])


def show(stage, value):
    if stage == "peak_memory":
        return f"{value / 2 ** 30:.2f} GiB"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def report(args, mine, theirs):
    names = {"load": "load (disk -> GPU)", "vision": "vision encoder", "qformer": "Q-Former + projection",
             "prefill": f"prefill ({len(PROMPT_IDS) + 33} tokens)", "decode": "decode, per token",
             "total": f"total ({args.tokens} new tokens)", "peak_memory": "peak GPU memory (allocator)"}
    rows = ["| stage | miniblip2 (CuPy fp16) | transformers (PyTorch fp16, eager) | ratio |", "|---|---|---|---|"]
    for stage in STAGES:
        a, b = median(mine, stage), median(theirs, stage)
        rows.append(f"| {names[stage]} | {show(stage, a)} | {show(stage, b)} | {a / b:.2f} |")
    layers = "all layers" if args.layers is None else f"{args.layers} layers per tower"
    header = (f"{gpu_description()}, {datetime.date.today().isoformat()}, {versions()}. Random weights at the "
              f"real blip2-opt-2.7b shapes ({layers}), docs/example.png and a 10-token prompt, {args.tokens} new "
              f"tokens forced, greedy; medians of {args.reps} runs after a warm-up. Ratios below 1 mean miniblip2 "
              "is faster.")
    return header + "\n\n" + "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help=f"folder of the random fp16 weights (default {DEFAULT_WEIGHTS}; --layers N adds -N-layers)")
    parser.add_argument("--layers", type=int, help="cut the vision encoder, Q-Former and decoder to N layers each")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up run")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens, forced")
    parser.add_argument("--doc", type=Path, help=f"write the GPU section here (a full-size run writes {DOC})")
    parser.add_argument("--child", choices=["miniblip2", "transformers"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        args.folder = args.weights
        result = (run_miniblip2 if args.child == "miniblip2" else run_transformers)(args.folder, args.reps, args.tokens)
        print(json.dumps(result))
        return
    from miniblip2.errors import DeviceError
    from miniblip2.runtime.device import array_module
    try:
        array_module("cuda")
    except DeviceError as err:
        sys.exit(f"bench/gpu.py needs an NVIDIA GPU: {err}")
    base = args.weights if args.layers is None else Path(f"{args.weights}-{args.layers}-layers")
    args.folder = ensure_weights(base, args.layers)
    mine, theirs = run_child("miniblip2", args), run_child("transformers", args)
    body = report(args, mine, theirs)
    print(body)
    doc = args.doc or (DOC if args.layers is None else None)
    if doc:
        write_section(doc, "GPU", "Written by `python bench/gpu.py` (full size).\n\n" + body)
        print(f"wrote the GPU section of {doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
