"""miniblip2 against transformers on the CPU: blip2-opt-2.7b in float32, no download.

    python bench/cpu.py                      # full size: 15 GB of random weights, written once
    python bench/cpu.py --layers 2 --reps 2  # a quick look: every tower cut to 2 layers

Random weights at the real shapes (the real config.json, `miniblip2.testing.random_checkpoint`'s
preset) are written once as fp32 safetensors shards in the hub layout and reused. Each
implementation then runs in its own process (so that its peak RSS is its own) on the same image
and prompt with the same thread count, captions it with 20 new tokens forced (greedy,
min_new_tokens = max_new_tokens = 20), once to warm up and then `--reps` times, and the medians
are reported. The stages are timed inside one `generate` call, the same way on both sides:
the vision encoder, Q-Former and language projection by wrapping them (forward hooks in
PyTorch), prefill and per-token decode by a streamer that notes when each token arrives.

A third process measures this machine's floors: the best single-precision matrix product
(GFLOP/s) and the best memory read rate (GB/s). Each stage is printed against its floor: work
that is matrix products (vision, Q-Former) against its FLOPs; decoding a token, which reads
every decoder weight and the LM head once, against those bytes.

A full-size run writes its table to docs/BENCHMARKS.md. The last line printed is
`total ratio miniblip2/transformers: X.XX`, the median of the per-repetition ratios.
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import PROMPT_IDS, StageClock, bench_inputs, write_section  # noqa: E402  (bench/common.py)

from miniblip2.blip2 import config_from_dict, expected_shapes, tied_weights  # noqa: E402
from miniblip2.checkpoint.safetensors import CheckpointError, check_weights, load_checkpoint  # noqa: E402
from miniblip2.testing.random_checkpoint import preset_config, write_random_checkpoint  # noqa: E402

DEFAULT_WEIGHTS = REPO / "weights" / "blip2-opt-2.7b-random"  # git-ignored, 15 GB
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --- the weights: written once, checked each time ---------------------------------------------

def weights_folder(base, layers):
    return Path(base) if layers is None else Path(f"{base}-{layers}-layers")


# The folder is reused when its config is the preset's and every shard is whole: the headers are
# read and checked (sizes, offsets, coverage) without touching the tensor bytes.
def ensure_weights(folder, layers):
    values = preset_config("blip2-opt-2.7b", layers)
    try:
        if json.loads((folder / "config.json").read_text()) == values:
            config = config_from_dict(values)
            check_weights(load_checkpoint(folder, progress=False), expected_shapes(config), tied=tied_weights(config))
            return folder
    except (OSError, ValueError, CheckpointError):
        pass
    print(f"writing random blip2-opt-2.7b weights (layers: {layers or 'all'}) to {folder} ...", file=sys.stderr)
    start = time.perf_counter()
    write_random_checkpoint(folder, "blip2-opt-2.7b", layers)
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


# --- work and bytes per stage, from the config ------------------------------------------------

def vision_flops(c):
    T, D, F = (c.image_size // c.patch_size) ** 2 + 1, c.hidden_size, c.intermediate_size
    per_layer = 2 * T * D * (3 * D + D + 2 * F) + 2 * 2 * T * T * D  # qkv, projection, MLP; QK^T and PV
    return 2 * (T - 1) * (c.num_channels * c.patch_size ** 2) * D + c.num_hidden_layers * per_layer


def qformer_flops(c, queries, image_tokens):
    D, E, F = c.hidden_size, c.encoder_hidden_size, c.intermediate_size
    self_attention = 2 * queries * 4 * D * D + 2 * 2 * queries * queries * D
    cross = 2 * queries * 2 * D * D + 2 * image_tokens * 2 * E * D + 2 * 2 * queries * image_tokens * D
    ffn = 2 * queries * 2 * D * F
    layers = range(c.num_hidden_layers)
    return sum(self_attention + ffn + (cross if i % c.cross_attention_frequency == 0 else 0) for i in layers)


def nbytes(shapes, prefixes):
    return sum(4 * math.prod(shape) for name, shape in shapes.items() if name.startswith(prefixes))


# The decoder weights a token reads: every layer, the final norm and the LM head (tied to the
# embeddings; one embedding row and one position row are negligible).
def decode_bytes(config):
    shapes = expected_shapes(config)
    return nbytes(shapes, ("language_model.model.decoder.layers.", "language_model.model.decoder.final_layer_norm",
                           "language_model.lm_head"))


def floors(config, prompt_length, machine):
    gflops, gbps = machine["sgemm_gflops"] * 1e9, machine["read_gbps"] * 1e9
    shapes = expected_shapes(config)
    text_params = decode_bytes(config) // 4 - config.text.vocab_size * config.text.hidden_size
    image_tokens = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    vision = max(vision_flops(config.vision) / gflops, nbytes(shapes, ("vision_model.",)) / gbps)
    qformer = max(qformer_flops(config.qformer, config.num_query_tokens, image_tokens) / gflops,
                  nbytes(shapes, ("qformer.",)) / gbps)
    prefill = max(2 * prompt_length * text_params / gflops, decode_bytes(config) / gbps)
    decode = decode_bytes(config) / gbps
    return {"vision": vision, "qformer": qformer, "prefill": prefill, "decode": decode}


# --- timing inside one generate call ----------------------------------------------------------

class TokenClock:
    """A streamer (transformers' put/end protocol) that notes when the prompt and each new token
    arrive: prompt -> first token is prefill, the gaps after that are decode steps."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def stages(self):
        prompt, first, last = self.times[0], self.times[1], self.times[-1]
        steps = len(self.times) - 2
        return {"prefill": first - prompt, "decode": (last - first) / steps, "new_tokens": len(self.times) - 1}


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux gives KiB


# The measurement loop both children share. `generate(streamer)` returns the new token count.
def measure(generate, stages, reps, load_seconds):
    runs = []
    for _ in range(reps + 1):  # run 0 warms the page cache and the allocator; it is kept apart
        stages.seconds.clear()
        clock = TokenClock()
        start = time.perf_counter()
        new_tokens = generate(clock)
        total = time.perf_counter() - start
        runs.append({"total": total, **stages.seconds, **clock.stages(), "generated": new_tokens})
    return {"load": load_seconds, "first": runs[0]["total"], "runs": runs[1:], "peak_rss": peak_rss()}


def run_miniblip2(folder, reps, tokens):
    import miniblip2
    start = time.perf_counter()
    model = miniblip2.load(folder, progress=False)
    load = time.perf_counter() - start
    pixel_values, input_ids, attention_mask = bench_inputs(model.config)
    stages = StageClock()
    for name in ("vision", "qformer", "project"):  # image_features calls these through self
        setattr(model, name, stages.wrap(name, getattr(model, name)))

    def generate(streamer):
        ids = model.generate(pixel_values, input_ids, attention_mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             streamer=streamer)
        return ids.shape[1] - input_ids.shape[1]

    return measure(generate, stages, reps, load)


def run_transformers(folder, reps, tokens, threads):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    pixel_values, input_ids, attention_mask = (torch.from_numpy(a) for a in bench_inputs(_config(folder)))
    stages = StageClock()
    for name, module in (("vision", model.vision_model), ("qformer", model.qformer),
                         ("project", model.language_projection)):
        stages.hook(name, module)

    def generate(streamer):
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                                 streamer=streamer)
        # transformers returns the prompt and the new ids (or only the new ids, in some versions)
        return ids.shape[1] - input_ids.shape[1] if ids.shape[1] > tokens else ids.shape[1]

    return measure(generate, stages, reps, load)


def _config(folder):
    return config_from_dict(json.loads((Path(folder) / "config.json").read_text()))


# --- the machine's floors -----------------------------------------------------------------------

def best_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


# The best single-precision matrix product: a large square sgemm, OpenBLAS through NumPy.
def sgemm_gflops(repeats=5, n=4096):
    a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    return 2 * n ** 3 / best_seconds(lambda: a @ b, repeats) / 1e9


# The floors: sgemm_gflops, and the best read of a 2 GB array: NumPy sums on every thread, or BLAS
# matrix-vector products, whichever is faster (decoding one token is exactly such a product over
# every weight).
def measure_machine(threads, repeats=5):
    from concurrent.futures import ThreadPoolExecutor
    sgemm = sgemm_gflops(repeats)
    big = np.ones((2 << 30) // 4, np.float32)  # 2 GB, every page touched
    chunks = np.array_split(big, threads)
    with ThreadPoolExecutor(threads) as pool:
        sums = big.nbytes / best_seconds(lambda: list(pool.map(np.sum, chunks)), repeats) / 1e9
    matrix, vector = big.reshape(-1, 4096), np.ones(4096, np.float32)
    gemv = big.nbytes / best_seconds(lambda: matrix @ vector, repeats) / 1e9
    return {"sgemm_gflops": sgemm, "read_gbps": max(sums, gemv), "sum_gbps": sums, "gemv_gbps": gemv,
            "peak_rss": peak_rss()}


def machine_description():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    return f"{model} ({simd}), {os.cpu_count()} cores, {mem_kb / 2 ** 20:.0f} GiB RAM"


# --- running the children -----------------------------------------------------------------------

def run_child(kind, args):
    env = dict(os.environ, **{name: str(args.threads) for name in THREAD_VARIABLES})
    command = [sys.executable, __file__, "--child", kind, "--weights", str(args.folder), "--reps", str(args.reps),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
    print(f"running {kind} ...", file=sys.stderr)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"the {kind} process failed (exit status {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(args):
    if args.child == "floors":
        result = measure_machine(args.threads)
    elif args.child == "miniblip2":
        result = run_miniblip2(args.weights, args.reps, args.tokens)
    else:
        result = run_transformers(args.weights, args.reps, args.tokens, args.threads)
    print(json.dumps(result))


# --- the report -------------------------------------------------------------------------------

STAGES = [("load", "load (from the page cache)"), ("vision", "vision encoder"), ("qformer", "Q-Former"),
          ("project", "language projection"), ("prefill", "prefill (43 tokens)"), ("decode", "decode, per token"),
          ("total", "20-token caption, end to end"), ("first", "first caption after load")]


def median_stage(result, stage):
    if stage in ("load", "first"):
        return result[stage]
    return statistics.median(run[stage] for run in result["runs"])


def seconds(value):
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def report(args, config, machine, mine, theirs):
    floor = floors(config, 32 + 1 + len(PROMPT_IDS), machine)
    floor["total"] = (floor["vision"] + floor["qformer"] + floor["prefill"] + (args.tokens - 1) * floor["decode"])
    weight_bytes = sum(p.stat().st_size for p in Path(args.folder).glob("*.safetensors"))
    rows = []
    for stage, label in STAGES:
        a, b = median_stage(mine, stage), median_stage(theirs, stage)
        f = floor.get(stage)
        rows.append([label, seconds(a), seconds(b), f"{a / b:.2f}", seconds(f) if f else "",
                     f"{a / f:.2f}" if f else "", f"{b / f:.2f}" if f else ""])
    rss = [mine["peak_rss"], theirs["peak_rss"]]
    rows.append(["peak RSS", *(f"{r / 1e9:.2f} GB" for r in rss), f"{rss[0] / rss[1]:.2f}",
                 f"{weight_bytes / 1e9:.2f} GB (weights)", f"{rss[0] / weight_bytes:.2f}", f"{rss[1] / weight_bytes:.2f}"])
    header = ["stage", "miniblip2", "transformers", "ratio", "floor", "miniblip2 / floor", "transformers / floor"]
    table = "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    ratios = [m["total"] / t["total"] for m, t in zip(mine["runs"], theirs["runs"])]
    generated = {run["generated"] for run in mine["runs"] + theirs["runs"]}
    layers = "all layers" if args.layers is None else f"{args.layers} layers per tower"
    notes = [
        f"- machine: {machine_description()}; {args.threads} threads for both; "
        f"{datetime.date.today().isoformat()}",
        f"- software: Python {platform.python_version()}, NumPy {np.__version__} ({_numpy_blas()}), "
        f"torch {_version('torch')}, transformers {_version('transformers')}",
        f"- model: blip2-opt-2.7b shapes ({layers}), random fp32 weights, {weight_bytes / 1e9:.2f} GB; "
        f"one 224 px image, a {32 + 1 + len(PROMPT_IDS)}-token prompt, {args.tokens} new tokens forced "
        f"(generated: {sorted(generated)}), greedy",
        f"- medians of {args.reps} repetitions after one warm-up run, each implementation in its own process",
        f"- floors: sgemm {machine['sgemm_gflops']:.0f} GFLOP/s (4096^2 matrix product), memory read "
        f"{machine['read_gbps']:.1f} GB/s (best of threaded sums {machine['sum_gbps']:.1f} and BLAS "
        f"matrix-vector {machine['gemv_gbps']:.1f}); vision {vision_flops(config.vision) / 1e9:.0f} GFLOP, "
        f"decode reads {decode_bytes(config) / 1e9:.2f} GB per token",
        f"- total ratio miniblip2/transformers per repetition: {', '.join(f'{r:.2f}' for r in ratios)}",
    ]
    return table, notes, statistics.median(ratios)


def _numpy_blas():
    config = np.show_config(mode="dicts") or {}
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', 'BLAS')} {blas.get('version', '')}".strip()


def _version(name):
    from importlib.metadata import version
    return version(name)


def write_doc(path, table, notes, ratio):
    write_section(path, "CPU", (
        "Written by `python bench/cpu.py` (full size): miniblip2 against transformers' PyTorch "
        "implementation of blip2-opt-2.7b in float32 on the same machine. Ratios below 1 mean miniblip2 "
        "is faster; \"floor\" is the time the stage would take at the machine's measured matrix-product "
        "rate (vision, Q-Former, prefill) or memory read rate (decode: every decoder weight and the LM "
        "head read once per token).\n\n"
        f"{table}\n\n" + "\n".join(notes) + f"\n\ntotal ratio miniblip2/transformers: {ratio:.2f}\n"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help=f"folder of the random weights (default {DEFAULT_WEIGHTS}; --layers N adds -N-layers)")
    parser.add_argument("--layers", type=int, help="cut the vision encoder, Q-Former and decoder to N layers each")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up run")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens, forced")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--doc", type=Path, help="write the table here (a full-size run writes docs/BENCHMARKS.md)")
    parser.add_argument("--child", choices=["floors", "miniblip2", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    args.folder = ensure_weights(weights_folder(args.weights, args.layers), args.layers)
    config = _config(args.folder)
    machine = run_child("floors", args)
    mine = run_child("miniblip2", args)
    theirs = run_child("transformers", args)
    table, notes, ratio = report(args, config, machine, mine, theirs)
    print(table + "\n\n" + "\n".join(notes) + "\n")
    doc = args.doc or (REPO / "docs" / "BENCHMARKS.md" if args.layers is None else None)
    if doc:
        write_doc(doc, table, notes, ratio)
        print(f"wrote {doc}", file=sys.stderr)
    print(f"total ratio miniblip2/transformers: {ratio:.2f}")


if __name__ == "__main__":
    main()
