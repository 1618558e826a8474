"""miniblip2 against transformers on the CPU: blip2-opt-2.7b or blip2-flan-t5-xl in float32, no download.

    python bench/cpu.py                                # blip2-opt-2.7b, full size: 15 GB of random weights
    python bench/cpu.py --model blip2-flan-t5-xl       # blip2-flan-t5-xl, full size: 15.8 GB
    python bench/cpu.py --layers 2 --reps 1            # a quick look: every tower cut to 2 layers

Random weights at the real shapes (the real config.json, `miniblip2.testing.random_checkpoint`'s
preset) are written once as fp32 safetensors shards in the hub layout to weights/<model>-random
(git-ignored) and reused. Each implementation then runs in its own process (so that its peak RSS
is its own) on the same image and prompt with the same thread count, captions it with 20 new
tokens forced (greedy, min_new_tokens = max_new_tokens = 20), once to warm up and then `--reps`
times, and the medians are reported. The stages are timed inside one `generate` call, the same
way on both sides: the vision encoder, Q-Former, language projection and (Flan-T5) the T5
encoder by wrapping them (forward hooks in PyTorch), the first token and per-token decode by a
streamer that notes when each token arrives.

OPT continues its 43-token prompt: prefill is the prompt's pass up to the first new token. T5 is
an encoder-decoder: its encoder reads the 43-token prompt once, then the decoder starts from
decoder_start_token_id; "first token" is that first decoder step, which also projects the encoder
output to every layer's cross-attention keys and values (counted from the later of the encoder's
end and the streamer's first call: transformers runs the encoder before it, miniblip2 after).

A third process measures this machine's floors: the best single-precision matrix product
(GFLOP/s) and the best memory read rate (GB/s). Each stage is printed against its floor: work
that is matrix products (vision, Q-Former, prefill, T5 encoder) against its FLOPs (or its weight
bytes, if more); decoding a token, which reads every decoder weight and the LM head once (T5:
all but the cross-attention K/V projections, used only in the first step), against those bytes.

A full-size run writes its table to its model's section of docs/BENCHMARKS.md ("## CPU" for
OPT, "## CPU, Flan-T5" for Flan-T5). The last line printed is
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
from miniblip2.checkpoint.safetensors import (  # noqa: E402
    CheckpointError,
    check_weights,
    load_checkpoint,
)
from miniblip2.testing.random_checkpoint import preset_config, write_random_checkpoint  # noqa: E402

MODELS = ("blip2-opt-2.7b", "blip2-flan-t5-xl")  # random_checkpoint presets
WEIGHTS = REPO / "weights"  # <model>-random[-N-layers], git-ignored, 15-16 GB each at full size
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# The doc section each model's full-size run rewrites.
HEADINGS = {"blip2-opt-2.7b": "CPU", "blip2-flan-t5-xl": "CPU, Flan-T5"}

# "Question: what is in the picture? Answer:" as Flan-T5 token ids (its SentencePiece tokenizer
# appends </s> = 1), after the 32 <image> ids: 43 encoder tokens, as long as OPT's prompt.
T5_PROMPT_IDS = [11860, 10, 125, 19, 16, 8, 1554, 58, 11801, 10, 1]


# --- the weights: written once, checked each time ---------------------------------------------

def weights_folder(base, layers):
    return Path(base) if layers is None else Path(f"{base}-{layers}-layers")


# The folder is reused when its config is the preset's and every shard is whole: the headers are
# read and checked (sizes, offsets, coverage) without touching the tensor bytes.
def ensure_weights(folder, model, layers):
    values = preset_config(model, layers)
    try:
        if json.loads((folder / "config.json").read_text()) == values:
            config = config_from_dict(values)
            check_weights(load_checkpoint(folder, progress=False), expected_shapes(config), tied=tied_weights(config))
            return folder
    except (OSError, ValueError, CheckpointError):
        pass
    print(f"writing random {model} weights (layers: {layers or 'all'}) to {folder} ...", file=sys.stderr)
    start = time.perf_counter()
    write_random_checkpoint(folder, model, layers)
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


def nbytes(shapes, prefixes, excluded=()):
    return sum(4 * math.prod(shape) for name, shape in shapes.items()
               if name.startswith(prefixes) and not (excluded and name.endswith(excluded)))


# T5's decoder cross-attention K/V projections: applied to the encoder output once, in the first
# decoder step, and never read again.
CROSS_KV = (".EncDecAttention.k.weight", ".EncDecAttention.v.weight")


# The decoder weights a token reads: every layer, the final norm and the LM head (one embedding
# row and one position row are negligible). OPT's LM head is tied to the embeddings; T5's is its
# own, and its decoder skips the cross-attention K/V projections after the first step.
def decode_bytes(config):
    shapes = expected_shapes(config)
    if config.text.is_encoder_decoder:
        return nbytes(shapes, ("language_model.decoder.block.", "language_model.decoder.final_layer_norm",
                               "language_model.lm_head"), excluded=CROSS_KV)
    return nbytes(shapes, ("language_model.model.decoder.layers.", "language_model.model.decoder.final_layer_norm",
                           "language_model.lm_head"))


# Each stage's floor: the slower of its FLOPs at the sgemm rate and its weight bytes at the read
# rate (a matrix product over a few rows is bounded by reading the matrix).
def floors(config, prompt_length, tokens, machine):
    gflops, gbps = machine["sgemm_gflops"] * 1e9, machine["read_gbps"] * 1e9
    bound = lambda flops, nbytes: max(flops / gflops, nbytes / gbps)
    shapes = expected_shapes(config)
    image_tokens = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    result = {"vision": bound(vision_flops(config.vision), nbytes(shapes, ("vision_model.",))),
              "qformer": bound(qformer_flops(config.qformer, config.num_query_tokens, image_tokens),
                               nbytes(shapes, ("qformer.",))),
              "decode": decode_bytes(config) / gbps}
    if config.text.is_encoder_decoder:
        encoder = nbytes(shapes, ("language_model.encoder.block.",))
        cross_kv = sum(4 * math.prod(shape) for name, shape in shapes.items() if name.endswith(CROSS_KV))
        result["encoder"] = bound(2 * prompt_length * encoder / 4, encoder)
        result["first"] = bound(2 * prompt_length * cross_kv / 4, cross_kv) + result["decode"]
        result["total"] = result["encoder"] + result["first"]
    else:
        text_params = decode_bytes(config) // 4 - config.text.vocab_size * config.text.hidden_size
        result["first"] = bound(2 * prompt_length * text_params, decode_bytes(config))  # prefill
        result["total"] = result["first"]
    result["total"] += result["vision"] + result["qformer"] + (tokens - 1) * result["decode"]
    return result


# --- timing inside one generate call ----------------------------------------------------------

class TokenClock:
    """A streamer (transformers' put/end protocol) that notes when the prompt and each new token
    arrive: prompt -> first token is prefill (OPT) or the first decoder step (T5, from the end of
    the encoder if that comes later), the gaps after that are decode steps."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def stages(self, encoder_end=None):
        prompt, first, last = self.times[0], self.times[1], self.times[-1]
        steps = len(self.times) - 2
        start = prompt if encoder_end is None else max(prompt, encoder_end)
        return {"first": first - start, "decode": (last - first) / steps, "new_tokens": len(self.times) - 1}


class Stages(StageClock):
    """bench/common.py's StageClock, also noting when each stage last ended."""

    def __init__(self):
        super().__init__()
        self.ended = {}

    def stop(self, name, *_):
        super().stop(name)
        self.ended[name] = time.perf_counter()


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux gives KiB


# The measurement loop both children share. `generate(streamer)` returns the new token count.
def measure(generate, stages, reps, load_seconds):
    runs = []
    for _ in range(reps + 1):  # run 0 warms the page cache and the allocator; it is kept apart
        stages.seconds.clear()
        stages.ended.clear()
        clock = TokenClock()
        start = time.perf_counter()
        new_tokens = generate(clock)
        total = time.perf_counter() - start
        runs.append({"total": total, **stages.seconds, **clock.stages(stages.ended.get("encoder")),
                     "generated": new_tokens})
    return {"load": load_seconds, "first": runs[0]["total"], "runs": runs[1:], "peak_rss": peak_rss()}


# The same image and prompt for both: bench/common.py's for OPT; for T5 the image ids, then the
# question in Flan-T5's ids.
def model_inputs(config):
    pixel_values, input_ids, attention_mask = bench_inputs(config)
    if config.text.is_encoder_decoder:
        input_ids = np.asarray([[config.image_token_index] * config.num_query_tokens + T5_PROMPT_IDS], dtype=np.int64)
        attention_mask = np.ones_like(input_ids)
    return pixel_values, input_ids, attention_mask


# New tokens in `generate`'s output [B, prompt + new]: T5's "prompt" is its decoder start token.
def new_tokens(ids, input_ids, config, tokens):
    if config.text.is_encoder_decoder:
        return ids.shape[1] - 1
    # transformers returns the prompt and the new ids (or only the new ids, in some versions)
    return ids.shape[1] - input_ids.shape[1] if ids.shape[1] > tokens else ids.shape[1]


def run_miniblip2(folder, reps, tokens):
    import miniblip2
    from miniblip2 import t5
    start = time.perf_counter()
    model = miniblip2.load(folder, progress=False)
    load = time.perf_counter() - start
    pixel_values, input_ids, attention_mask = model_inputs(model.config)
    stages = Stages()
    for name in ("vision", "qformer", "project"):  # image_features calls these through self
        setattr(model, name, stages.wrap(name, getattr(model, name)))
    t5.t5_encoder = stages.wrap("encoder", t5.t5_encoder)  # T5Decoding.start calls it by its module name

    def generate(streamer):
        ids = model.generate(pixel_values, input_ids, attention_mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             streamer=streamer)
        return new_tokens(ids, input_ids, model.config, tokens)

    return measure(generate, stages, reps, load)


def run_transformers(folder, reps, tokens, threads):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    config = _config(folder)
    pixel_values, input_ids, attention_mask = (torch.from_numpy(a) for a in model_inputs(config))
    stages = Stages()
    modules = [("vision", model.vision_model), ("qformer", model.qformer), ("project", model.language_projection)]
    if config.text.is_encoder_decoder:
        modules.append(("encoder", model.language_model.encoder))  # T5Stack, run once before decoding
    for name, module in modules:
        stages.hook(name, module)

    def generate(streamer):
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                                 streamer=streamer)
        return new_tokens(ids, input_ids, config, tokens)

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

# CPU seconds the whole machine has been busy (user, nice, system, irq, softirq, steal), from
# /proc/stat; None where there is none.
def busy_seconds():
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# Each child's result, with how busy the other users of the machine kept it meanwhile: the
# 1-minute load average before and after it, and `others`, the share of all cores that the
# machine was busy beyond the child's own CPU time (0.0: only the child ran; 0.5: half the
# cores went to someone else).
def run_child(kind, args):
    command = [sys.executable, __file__, "--child", kind, "--weights", str(args.folder), "--reps", str(args.reps),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
    return run_measured(command, kind, args.threads)


# Run one child `command` with `threads` BLAS/OpenMP threads; its last stdout line is its JSON
# result, to which the load average before and after and the others' share of the cores are added.
def run_measured(command, label, threads):
    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    before = os.getloadavg()[0]
    print(f"running {label} (load average {before:.2f}) ...", file=sys.stderr)
    usage, busy, start = resource.getrusage(resource.RUSAGE_CHILDREN), busy_seconds(), time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"the {label} process failed (exit status {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    own = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    others = None if busy is None else max(0.0, busy_seconds() - busy - own) / (wall * os.cpu_count())
    result |= {"loadavg": [before, os.getloadavg()[0]], "others": others}
    print(f"  {label} done in {wall:.0f} s (load average {result['loadavg'][1]:.2f}; others used "
          f"{'?' if others is None else f'{others:.0%}'} of the cores)", file=sys.stderr)
    return result


def child_main(args):
    if args.child == "floors":
        result = measure_machine(args.threads)
    elif args.child == "miniblip2":
        result = run_miniblip2(args.weights, args.reps, args.tokens)
    else:
        result = run_transformers(args.weights, args.reps, args.tokens, args.threads)
    print(json.dumps(result))


# --- the report -------------------------------------------------------------------------------

# The rows of each model's table: (key, label); {T} is the prompt length, {N} the new tokens.
IMAGE_STAGES = [("load", "load"), ("vision", "vision encoder"), ("qformer", "Q-Former"),
                ("project", "language projection")]
CAPTION_STAGES = [("total", "{N}-token caption, end to end"), ("first_caption", "first caption after load")]
STAGES = {
    "opt": IMAGE_STAGES + [("first", "prefill ({T} tokens)"), ("decode", "decode, per token")] + CAPTION_STAGES,
    "t5": IMAGE_STAGES + [("encoder", "T5 encoder ({T} tokens)"),
                          ("first", "first token (decoder start, cross K/V)"),
                          ("decode", "decode, per token")] + CAPTION_STAGES,
}


def median_stage(result, stage):
    if stage == "load":
        return result["load"]
    if stage == "first_caption":
        return result["first"]
    return statistics.median(run[stage] for run in result["runs"])


def seconds(value):
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def report(args, config, machine, mine, theirs):
    t5 = config.text.is_encoder_decoder
    prompt_length = config.num_query_tokens + (len(T5_PROMPT_IDS) if t5 else 1 + len(PROMPT_IDS))
    floor = floors(config, prompt_length, args.tokens, machine)
    floor.pop("first_caption", None)
    weight_bytes = sum(p.stat().st_size for p in Path(args.folder).glob("*.safetensors"))
    rows = []
    for stage, label in STAGES["t5" if t5 else "opt"]:
        a, b = median_stage(mine, stage), median_stage(theirs, stage)
        f = floor.get(stage)
        label = label.format(T=prompt_length, N=args.tokens)
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
    if t5 and args.layers is not None:
        layers += " (T5: encoder and decoder both)"
    load = ", ".join(f"{name} {r['loadavg'][0]:.2f} -> {r['loadavg'][1]:.2f}"
                     + ("" if r["others"] is None else f" (others {r['others']:.0%})")
                     for name, r in (("floors", machine), ("miniblip2", mine), ("transformers", theirs)))
    prompt = ("the 32 image ids and \"Question: what is in the picture? Answer:</s>\" in Flan-T5's ids as the "
              "encoder input, the decoder started from decoder_start_token_id 0" if t5 else
              "the 32 image ids, BOS and \"Question: what is in the picture? Answer:\" in OPT's ids")
    notes = [
        f"- machine: {machine_description()}; {args.threads} threads for both; "
        f"{datetime.date.today().isoformat()}; other developers share the cores: 1-minute load average "
        f"before -> after each process (it counts the process itself) and the share of the cores other "
        f"processes used while it ran: {load}",
        f"- software: Python {platform.python_version()}, NumPy {np.__version__} ({_numpy_blas()}), "
        f"torch {_version('torch')}, transformers {_version('transformers')}",
        f"- model: {args.model} shapes ({layers}), random fp32 weights, {weight_bytes / 1e9:.2f} GB; "
        f"one 224 px image, a {prompt_length}-token prompt ({prompt}), {args.tokens} new tokens forced "
        f"(generated: {sorted(generated)}), greedy",
        f"- medians of {args.reps} repetitions after one warm-up run, each implementation in its own process, "
        "one after the other; load: both memory-map the shards (transformers 5.23 keeps fp32 tensors on the "
        "file's pages too), and miniblip2 then reads every byte once for NaN and infinity (`check_finite`), "
        "from the page cache as far as it holds the file",
        f"- floors: sgemm {machine['sgemm_gflops']:.0f} GFLOP/s (4096^2 matrix product), memory read "
        f"{machine['read_gbps']:.1f} GB/s (best of threaded sums {machine['sum_gbps']:.1f} and BLAS "
        f"matrix-vector {machine['gemv_gbps']:.1f}); vision {vision_flops(config.vision) / 1e9:.0f} GFLOP, "
        f"decode reads {decode_bytes(config) / 1e9:.2f} GB per token"
        + (" (decoder blocks without the cross-attention K/V projections, final norm, lm_head)" if t5 else ""),
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


def write_doc(path, model, table, notes, ratio):
    command = "python bench/cpu.py" + ("" if model == MODELS[0] else f" --model {model}")
    stages = ("vision, Q-Former, T5 encoder, the first token's cross-attention K/V" if "t5" in model else
              "vision, Q-Former, prefill")
    write_section(path, HEADINGS[model], (
        f"Written by `{command}` (full size): miniblip2 against transformers' PyTorch "
        f"implementation of {model} in float32 on the same machine. Ratios below 1 mean miniblip2 "
        "is faster; \"floor\" is the time the stage would take at the machine's measured matrix-product "
        f"rate ({stages}) or memory read rate (decode: every decoder weight and the LM "
        "head read once per token).\n\n"
        f"{table}\n\n" + "\n".join(notes) + f"\n\ntotal ratio miniblip2/transformers: {ratio:.2f}\n"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default=MODELS[0], help=f"default {MODELS[0]}")
    parser.add_argument("--weights", type=Path,
                        help=f"folder of the random weights (default {WEIGHTS}/<model>-random; --layers N adds "
                             "-N-layers)")
    parser.add_argument("--layers", type=int,
                        help="cut the vision encoder, Q-Former and language model (T5: encoder and decoder) to N "
                             "layers each")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up run")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens, forced")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--doc", type=Path, help="write the table here (a full-size run writes docs/BENCHMARKS.md)")
    parser.add_argument("--child", choices=["floors", "miniblip2", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    base = args.weights or WEIGHTS / f"{args.model}-random"
    args.folder = ensure_weights(weights_folder(base, args.layers), args.model, args.layers)
    config = _config(args.folder)
    machine = run_child("floors", args)
    mine = run_child("miniblip2", args)
    theirs = run_child("transformers", args)
    table, notes, ratio = report(args, config, machine, mine, theirs)
    print(table + "\n\n" + "\n".join(notes) + "\n")
    doc = args.doc or (REPO / "docs" / "BENCHMARKS.md" if args.layers is None else None)
    if doc:
        write_doc(doc, args.model, table, notes, ratio)
        print(f"wrote {doc}", file=sys.stderr)
    print(f"total ratio miniblip2/transformers: {ratio:.2f}")


if __name__ == "__main__":
    main()
