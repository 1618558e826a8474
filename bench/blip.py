"""miniblip2 against transformers on the CPU: BLIP captioning (base, large) and VQA (base) in float32.

    python bench/blip.py                                    # all three, full size, writes the doc section
    python bench/blip.py --models blip-vqa-base --reps 1    # one model, a quick look (no doc)

Random weights at the real shapes are written once per model to weights/<model>-random
(git-ignored) and reused: transformers' class is built from the real config.json
(/work/shared/reference/<model>, or --reference), every parameter drawn normal * 0.02 (layer
norm weights 1 + normal * 0.02), and saved with save_pretrained (safetensors). Like
bench/cpu.py, each implementation runs in its own process (its peak RSS its own) with the same
thread count, on the same 384 px image (docs/example.png) and ids, once to warm up and then
`--reps` times; medians are reported. Captioning: a 20-token caption from [DEC] (greedy,
min_new_tokens = max_new_tokens = 20). VQA: "what is in the picture?" and a 10-token answer,
forced the same way.

Stages inside one `generate` call, timed the same way on both sides: the vision encoder (and the
VQA question encoder) by wrapping them (forward hooks in PyTorch); the first token from the end
of the last of those to the streamer's first new id (it includes the cross-attention keys and
values of the image or question, which miniblip2 computes before the decoding loop and
transformers inside its first step); per-token decode from the gaps between later ids.

Floors, from a third process (bench/cpu.py's measure_machine: the best sgemm rate and the best
memory read rate): vision and question encoder at their FLOPs (or weight bytes, if more); decode
at the bytes a token reads (the decoder's layers without the cross-attention K/V projections,
used only in the first step, and the LM head); the first token at its cross K/V FLOPs plus one
decode.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import IMAGE, write_section
from cpu import (
    Stages,
    TokenClock,
    _numpy_blas,
    _version,
    machine_description,
    measure_machine,
    nbytes,
    peak_rss,
    run_measured,
    seconds,
    vision_flops,
)

from miniblip2.blip import (
    IGNORED_WEIGHTS,
    TIED_WEIGHTS,
    Blip,
    BlipQuestionAnswering,
    read_config,
)
from miniblip2.checkpoint.safetensors import (
    CheckpointError,
    check_weights,
    load_checkpoint,
)

MODELS = {"blip-image-captioning-base": "caption", "blip-image-captioning-large": "caption", "blip-vqa-base": "vqa"}
REFERENCE = Path("/work/shared/reference")  # the real config.json of each model
WEIGHTS = REPO / "weights"
HEADING = "CPU, BLIP"
QUESTION_IDS = [101, 2054, 2003, 1999, 1996, 3861, 1029, 102]  # [CLS] what is in the picture? [SEP] (BERT ids)
TOKENS = {"caption": 20, "vqa": 10}
CROSS_KV = tuple(f".crossattention.self.{p}.{q}" for p in ("key", "value") for q in ("weight", "bias"))


def miniblip2_class(kind):
    return BlipQuestionAnswering if kind == "vqa" else Blip


# --- the weights: written once, checked each time ---------------------------------------------

def ensure_weights(name, reference, base):
    folder, kind = base / f"{name}-random", MODELS[name]
    config = read_config(reference / name)
    try:
        if read_config(folder) == config:
            check_weights(load_checkpoint(folder, progress=False), miniblip2_class(kind).expected_shapes(config),
                          TIED_WEIGHTS, IGNORED_WEIGHTS)
            return folder
    except (OSError, ValueError, CheckpointError):
        pass
    print(f"writing random {name} weights to {folder} ...", file=sys.stderr)
    start = time.perf_counter()
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    cls = transformers.BlipForQuestionAnswering if kind == "vqa" else transformers.BlipForConditionalGeneration
    model = cls(transformers.BlipConfig.from_pretrained(reference / name)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                p.normal_(0, 0.02, generator=generator)
                if isinstance(module, torch.nn.LayerNorm) and pname == "weight":
                    p.add_(1.0)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


# --- the inputs and the two implementations ---------------------------------------------------

def inputs(kind, size):
    from miniblip2.checkpoint.image import ImageConfig, preprocess
    pixel_values = preprocess([IMAGE], ImageConfig(height=size, width=size))  # [1, 3, 384, 384]
    if kind == "caption":
        return pixel_values, None, None  # generate starts from [DEC] alone
    ids = np.asarray([QUESTION_IDS], dtype=np.int64)
    return pixel_values, ids, np.ones_like(ids)


def measure(generate, stages, kind, reps, load_seconds):
    before = "question" if kind == "vqa" else "vision"
    runs = []
    for _ in range(reps + 1):  # run 0 warms up; kept apart as "first after load"
        stages.seconds.clear()
        stages.ended.clear()
        clock = TokenClock()
        start = time.perf_counter()
        generated = generate(clock)
        total = time.perf_counter() - start
        t = clock.times
        runs.append({"total": total, **stages.seconds, "first": t[1] - stages.ended[before],
                     "decode": (t[-1] - t[1]) / (len(t) - 2), "generated": generated, "streamed": len(t) - 1})
    return {"load": load_seconds, "first_run": runs[0]["total"], "runs": runs[1:], "peak_rss": peak_rss()}


def run_miniblip2(folder, kind, reps, tokens):
    import miniblip2
    start = time.perf_counter()
    model = miniblip2.load(folder, progress=False)
    load = time.perf_counter() - start
    pixel_values, input_ids, attention_mask = inputs(kind, model.config.vision.image_size)
    stages = Stages()
    model.vision = stages.wrap("vision", model.vision)  # _prepare_generation calls these through self
    if kind == "vqa":
        model.encode_question = stages.wrap("question", model.encode_question)

    def generate(streamer):
        ids = model.generate(pixel_values, input_ids, attention_mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             streamer=streamer)
        return ids.shape[1] - 1  # after [DEC]

    return measure(generate, stages, kind, reps, load)


def run_transformers(folder, kind, reps, tokens, threads):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    cls = transformers.BlipForQuestionAnswering if kind == "vqa" else transformers.BlipForConditionalGeneration
    start = time.perf_counter()
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    arrays = inputs(kind, model.config.vision_config.image_size)
    pixel_values, input_ids, attention_mask = (None if a is None else torch.from_numpy(a) for a in arrays)
    stages = Stages()
    stages.hook("vision", model.vision_model)
    if kind == "vqa":
        stages.hook("question", model.text_encoder)

    def generate(streamer):
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                                 streamer=streamer)
        return ids.shape[1] - 1

    return measure(generate, stages, kind, reps, load)


# --- children -------------------------------------------------------------------------------

def run_child(kind, args, folder=None, model=None):
    command = [sys.executable, __file__, "--child", kind, "--reps", str(args.reps), "--threads", str(args.threads)]
    if folder:
        command += ["--weights", str(folder), "--kind", MODELS[model]]
    return run_measured(command, f"{kind} {model or ''}".strip(), args.threads)


def child_main(args):
    if args.child == "floors":
        result = measure_machine(args.threads)
    elif args.child == "miniblip2":
        result = run_miniblip2(args.weights, args.kind, args.reps, TOKENS[args.kind])
    else:
        result = run_transformers(args.weights, args.kind, args.reps, TOKENS[args.kind], args.threads)
    print(json.dumps(result))


# --- floors and the report ------------------------------------------------------------------

def floors(config, kind, machine):
    gflops, gbps = machine["sgemm_gflops"] * 1e9, machine["read_gbps"] * 1e9
    bound = lambda flops, nbytes: max(flops / gflops, nbytes / gbps)
    shapes = miniblip2_class(kind).expected_shapes(config)
    image_tokens = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    result = {"vision": bound(vision_flops(config.vision), nbytes(shapes, ("vision_model.",)))}
    decoder = ("text_decoder.bert.encoder.layer.", "text_decoder.cls.")
    decode = nbytes(shapes, decoder, excluded=CROSS_KV)
    result["decode"] = decode / gbps
    cross_kv = nbytes(shapes, decoder) - decode  # bytes = 4 x parameters
    context = image_tokens
    if kind == "vqa":
        L = len(QUESTION_IDS)
        layers = nbytes(shapes, ("text_encoder.encoder.layer.",))
        encoder_kv = nbytes(shapes, ("text_encoder.encoder.layer.",)) - nbytes(
            shapes, ("text_encoder.encoder.layer.",), excluded=CROSS_KV)
        result["question"] = bound(2 * L * (layers - encoder_kv) / 4 + 2 * image_tokens * encoder_kv / 4, layers)
        context = L
    result["first"] = bound(2 * context * cross_kv / 4, cross_kv) + result["decode"]
    tokens = TOKENS[kind]
    result["total"] = sum(result.get(s, 0) for s in ("vision", "question", "first")) + (tokens - 1) * result["decode"]
    result["decode_bytes"] = decode
    return result


def median_stage(result, stage):
    if stage in ("load", "first_run"):
        return result[stage]
    return statistics.median(run[stage] for run in result["runs"])


def model_table(name, folder, config, machine, mine, theirs):
    kind, N = MODELS[name], TOKENS[MODELS[name]]
    floor = floors(config, kind, machine)
    image_tokens = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    rows_spec = [("load", "load"), ("vision", f"vision encoder ({config.vision.image_size} px, {image_tokens} tokens)")]
    if kind == "vqa":
        rows_spec += [("question", f"question encoder ({len(QUESTION_IDS)} tokens)"),
                      ("first", "first token (question cross K/V, [DEC])"), ("decode", "decode, per token"),
                      ("total", f"{N}-token answer, end to end")]
    else:
        rows_spec += [("first", "first token (image cross K/V, [DEC])"), ("decode", "decode, per token"),
                      ("total", f"{N}-token caption, end to end")]
    rows_spec += [("first_run", "first call after load")]
    rows = []
    for stage, label in rows_spec:
        a, b = median_stage(mine, stage), median_stage(theirs, stage)
        f = floor.get(stage)
        rows.append([label, seconds(a), seconds(b), f"{a / b:.2f}", seconds(f) if f else "",
                     f"{a / f:.2f}" if f else "", f"{b / f:.2f}" if f else ""])
    weight_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    rss = [mine["peak_rss"], theirs["peak_rss"]]
    rows.append(["peak RSS", *(f"{r / 1e9:.2f} GB" for r in rss), f"{rss[0] / rss[1]:.2f}",
                 f"{weight_bytes / 1e9:.2f} GB (weights)", f"{rss[0] / weight_bytes:.2f}",
                 f"{rss[1] / weight_bytes:.2f}"])
    header = ["stage", "miniblip2", "transformers", "ratio", "floor", "miniblip2 / floor", "transformers / floor"]
    table = "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    ratios = [m["total"] / t["total"] for m, t in zip(mine["runs"], theirs["runs"])]
    generated = sorted({r["generated"] for r in mine["runs"] + theirs["runs"]}
                       | {r["streamed"] for r in mine["runs"] + theirs["runs"]})
    load = ", ".join(f"{who} {r['loadavg'][0]:.2f} -> {r['loadavg'][1]:.2f}"
                     + ("" if r["others"] is None else f" (others {r['others']:.0%})")
                     for who, r in (("miniblip2", mine), ("transformers", theirs)))
    notes = [f"- random fp32 weights, {weight_bytes / 1e9:.2f} GB; vision {vision_flops(config.vision) / 1e9:.0f} "
             f"GFLOP; decode reads {floor['decode_bytes'] / 1e9:.3f} GB per token; new tokens generated: {generated}",
             f"- load average before -> after each process: {load}",
             f"- total ratio per repetition: {', '.join(f'{r:.2f}' for r in ratios)}; median "
             f"**{statistics.median(ratios):.2f}**"]
    return f"### {name}\n\n{table}\n\n" + "\n".join(notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="folder of <model>/config.json")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up run")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--doc", type=Path, help="write the section here (default docs/BENCHMARKS.md when all three "
                                                 "models run with 3 or more repetitions)")
    parser.add_argument("--child", choices=["floors", "miniblip2", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["caption", "vqa"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    folders = {name: ensure_weights(name, args.reference, WEIGHTS) for name in args.models}
    machine = run_child("floors", args)
    sections = []
    for name, folder in folders.items():
        mine = run_child("miniblip2", args, folder, name)
        theirs = run_child("transformers", args, folder, name)
        sections.append(model_table(name, folder, read_config(folder), machine, mine, theirs))
        print(sections[-1] + "\n", flush=True)
    header = "\n".join([
        "Written by `python bench/blip.py`: miniblip2 against transformers' PyTorch BLIP in float32 on the same "
        "machine and threads. Ratios below 1 mean miniblip2 is faster (target: 0.8 or below); \"floor\" is the "
        "stage's time at the machine's measured matrix-product rate (vision, question encoder, the first token's "
        "cross-attention K/V) or memory read rate (decode: every decoder layer without the cross K/V projections, "
        "and the LM head, read once per token).",
        "",
        f"- machine: {machine_description()}; {args.threads} threads for both; {datetime.date.today().isoformat()}; "
        f"other developers share the cores (load averages below; floors process "
        f"{machine['loadavg'][0]:.2f} -> {machine['loadavg'][1]:.2f})",
        f"- software: Python {platform.python_version()}, NumPy {np.__version__} ({_numpy_blas()}), "
        f"torch {_version('torch')}, transformers {_version('transformers')}",
        f"- floors: sgemm {machine['sgemm_gflops']:.0f} GFLOP/s (4096^2), memory read {machine['read_gbps']:.1f} GB/s "
        f"(best of threaded sums {machine['sum_gbps']:.1f} and BLAS matrix-vector {machine['gemv_gbps']:.1f})",
        f"- inputs: docs/example.png at 384 px; captions from [DEC] with {TOKENS['caption']} new tokens forced; VQA "
        f"\"what is in the picture?\" ({len(QUESTION_IDS)} BERT ids) with {TOKENS['vqa']} answer tokens forced; "
        "greedy; ids given directly (no tokenizer in the timings)",
        f"- medians of {args.reps} repetitions after one warm-up call, each implementation in its own process, one "
        "after the other; miniblip2's load reads every byte once for NaN and infinity (`check_finite`)",
    ])
    body = header + "\n\n" + "\n\n".join(sections) + "\n"
    doc = args.doc or (REPO / "docs" / "BENCHMARKS.md" if set(args.models) == set(MODELS) and args.reps >= 3 else None)
    if doc:
        write_section(doc, HEADING, body)
        print(f"wrote {doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
