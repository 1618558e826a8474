"""Where the vision encoder's CPU time goes: one EVA ViT-g layer at full size, op by op.

    python bench/vision_layer.py             # about a minute; writes docs/BENCHMARKS.md
    python bench/vision_layer.py --reps 50

bench/cpu.py times the whole vision encoder (39 of these layers) against the machine's matrix
product floor. This script takes one layer apart: every matrix product, layer norm, softmax and
GELU of `vision.vit_layer` at blip2-opt-2.7b's shapes (257 tokens, width 1408, 16 heads, MLP
6144), in miniblip2 (NumPy) and in PyTorch (the same ops through torch.nn.functional, and
transformers' own Blip2EncoderLayer for the whole layer), on the same random weights, each in
its own process with the same thread count. Medians of `--reps` runs after a warm-up. Each
product is shown at its GFLOP/s beside the 4096^2 sgemm rate that bench/cpu.py calls the floor.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import write_section  # noqa: E402  (bench/common.py)
from cpu import THREAD_VARIABLES, machine_description, sgemm_gflops  # noqa: E402  (bench/cpu.py)

from miniblip2 import nn, vision  # noqa: E402
from miniblip2.blip2 import config_from_dict  # noqa: E402
from miniblip2.checkpoint.safetensors import nest  # noqa: E402
from miniblip2.testing.random_checkpoint import preset_config  # noqa: E402

T, D, H, F = 257, 1408, 16, 6144  # tokens, width, heads, MLP width of blip2-opt-2.7b's vision tower
K = D // H
EPS = 1e-6
# (name, shape as written in the table, FLOP; 0 for the elementwise ops)
OPS = [("layer norm 1", "[257, 1408]", 0), ("qkv product", "[257, 1408] x [1408, 4224]", 2 * T * D * 3 * D),
       ("scores q k^T", "16 x [257, 88] x [88, 257]", 2 * H * T * T * K), ("softmax", "[16, 257, 257]", 0),
       ("probs v", "16 x [257, 257] x [257, 88]", 2 * H * T * T * K),
       ("projection", "[257, 1408] x [1408, 1408]", 2 * T * D * D), ("layer norm 2", "[257, 1408]", 0),
       ("fc1", "[257, 1408] x [1408, 6144]", 2 * T * D * F), ("GELU (exact)", "[257, 6144]", 0),
       ("fc2", "[257, 6144] x [6144, 1408]", 2 * T * F * D)]
LAYER_FLOP = sum(flop for _, _, flop in OPS)


def layer_weights(seed=0):
    """One layer's weights by their checkpoint names ("mlp.fc1.weight", [out, in]), N(0, 0.02)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, n_out, n_in in [("self_attn.qkv", 3 * D, D), ("self_attn.projection", D, D), ("mlp.fc1", F, D),
                              ("mlp.fc2", D, F)]:
        flat[f"{name}.weight"] = rng.normal(0, 0.02, (n_out, n_in)).astype(np.float32)
        flat[f"{name}.bias"] = rng.normal(0, 0.02, n_out).astype(np.float32)
    for name in ("layer_norm1", "layer_norm2"):
        flat[f"{name}.weight"], flat[f"{name}.bias"] = np.ones(D, np.float32), np.zeros(D, np.float32)
    return flat


def layer_inputs(w, seed=1):
    """The input of every op, as the layer computes them (so each op sees realistic values)."""
    x = np.random.default_rng(seed).standard_normal((1, T, D), dtype=np.float32)
    h = nn.layer_norm(x, w["layer_norm1"], EPS)
    qkv = nn.linear(h, w["self_attn"]["qkv"]).reshape(1, T, 3, H, K).transpose(2, 0, 3, 1, 4)
    scores = nn.matmul(qkv[0], qkv[1].swapaxes(-1, -2)) * K ** -0.5
    probs = nn.softmax(scores)
    attended = nn.merge_heads(nn.matmul(probs, qkv[2]))
    x2 = x + nn.linear(attended, w["self_attn"]["projection"])
    h2 = nn.layer_norm(x2, w["layer_norm2"], EPS)
    hidden = nn.linear(h2, w["mlp"]["fc1"])
    return dict(x=x, h=h, q=qkv[0], k=qkv[1], v=qkv[2], scores=scores, probs=probs, attended=attended,
                x2=x2, h2=h2, hidden=hidden, activated=nn.gelu(hidden))


def numpy_ops(w, a):
    attn, mlp = w["self_attn"], w["mlp"]
    return [lambda: nn.layer_norm(a["x"], w["layer_norm1"], EPS), lambda: nn.linear(a["h"], attn["qkv"]),
            lambda: nn.matmul(a["q"], a["k"].swapaxes(-1, -2)), lambda: nn.softmax(a["scores"]),
            lambda: nn.matmul(a["probs"], a["v"]), lambda: nn.linear(a["attended"], attn["projection"]),
            lambda: nn.layer_norm(a["x2"], w["layer_norm2"], EPS), lambda: nn.linear(a["h2"], mlp["fc1"]),
            lambda: nn.gelu(a["hidden"]), lambda: nn.linear(a["activated"], mlp["fc2"])]


def torch_ops(flat, a):
    import torch
    import torch.nn.functional as tf
    t = torch.from_numpy  # views stay views (q, k, v are strided, as in the layer)
    p = lambda name: {"weight": t(flat[f"{name}.weight"]), "bias": t(flat[f"{name}.bias"])}
    a = {name: t(array) for name, array in a.items()}
    norm = lambda x, name: tf.layer_norm(x, (D,), **p(name), eps=EPS)
    return [lambda: norm(a["x"], "layer_norm1"), lambda: tf.linear(a["h"], **p("self_attn.qkv")),
            lambda: a["q"] @ a["k"].transpose(-1, -2), lambda: torch.softmax(a["scores"], -1),
            lambda: a["probs"] @ a["v"], lambda: tf.linear(a["attended"], **p("self_attn.projection")),
            lambda: norm(a["x2"], "layer_norm2"), lambda: tf.linear(a["h2"], **p("mlp.fc1")),
            lambda: tf.gelu(a["hidden"]), lambda: tf.linear(a["activated"], **p("mlp.fc2"))]


def numpy_layer(w, a):
    config = config_from_dict(preset_config("blip2-opt-2.7b")).vision
    return lambda: vision.vit_layer(a["x"], w, config)


def torch_layer(flat, a):
    import torch
    from transformers import Blip2VisionConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer
    config = Blip2VisionConfig()  # its defaults are blip2-opt-2.7b's vision tower
    assert (config.hidden_size, config.intermediate_size, config.layer_norm_eps) == (D, F, EPS)
    config._attn_implementation = "eager"
    layer = Blip2EncoderLayer(config).eval()
    layer.load_state_dict({name: torch.from_numpy(array) for name, array in flat.items()})
    x = torch.from_numpy(a["x"])
    return lambda: layer(x)


def median_ms(function, reps):
    function()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def child(kind, reps, threads):
    flat = layer_weights()
    w = nest(flat)
    a = layer_inputs(w)
    if kind == "torch":
        import torch
        torch.set_num_threads(threads)
        ops, layer = torch_ops(flat, a), torch_layer(flat, a)
        with torch.no_grad():
            ours = numpy_layer(w, a)()  # both sides must do the same work
            difference = np.abs(layer().numpy() - ours).max() / np.abs(ours).max()
            assert difference < 1e-4, f"Blip2EncoderLayer and vit_layer differ by {difference:.1e} (relative)"
            return {"ops": [median_ms(op, reps) for op in ops], "layer": median_ms(layer, reps)}
    return {"ops": [median_ms(op, reps) for op in numpy_ops(w, a)], "layer": median_ms(numpy_layer(w, a), reps),
            "sgemm_gflops": sgemm_gflops()}  # the floor, measured as bench/cpu.py measures it


def run_child(kind, args):
    env = dict(os.environ, **{name: str(args.threads) for name in THREAD_VARIABLES})
    command = [sys.executable, __file__, "--child", kind, "--reps", str(args.reps), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(mine, theirs, threads):
    rate = lambda flop, ms: f"{flop / ms / 1e6:.0f}" if flop else ""
    rows = [[name, shape, f"{flop / 1e9:.3f}" if flop else "", f"{a:.2f}", rate(flop, a), f"{b:.2f}", rate(flop, b),
             f"{a / b:.2f}"] for (name, shape, flop), a, b in zip(OPS, mine["ops"], theirs["ops"])]
    products = [i for i, (_, _, flop) in enumerate(OPS) if flop]
    for label, pick in [("all products", products), ("all elementwise", [i for i in range(len(OPS)) if i not in products])]:
        a, b = sum(mine["ops"][i] for i in pick), sum(theirs["ops"][i] for i in pick)
        flop = sum(OPS[i][2] for i in pick)
        rows.append([f"**{label}**", "", f"{flop / 1e9:.3f}" if flop else "", f"{a:.2f}", rate(flop, a), f"{b:.2f}",
                     rate(flop, b), f"{a / b:.2f}"])
    a, b = mine["layer"], theirs["layer"]
    rows.append(["**one layer** (vit_layer / Blip2EncoderLayer)", "", f"{LAYER_FLOP / 1e9:.3f}", f"{a:.2f}",
                 rate(LAYER_FLOP, a), f"{b:.2f}", rate(LAYER_FLOP, b), f"{a / b:.2f}"])
    floor_ms = LAYER_FLOP / mine["sgemm_gflops"] / 1e6
    rows.append(["floor: the layer's FLOP at the 4096^2 sgemm rate", "", "", f"{floor_ms:.2f}",
                 f"{mine['sgemm_gflops']:.0f}", "", "", ""])
    header = ["op", "shape", "GFLOP", "miniblip2 ms", "GFLOP/s", "PyTorch ms", "GFLOP/s", "ratio"]
    table = "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    notes = (f"- machine: {machine_description()}; {threads} threads for both; {datetime.date.today().isoformat()}\n"
             f"- one layer / floor: miniblip2 {a / floor_ms:.2f}, PyTorch {b / floor_ms:.2f}")
    return table, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--child", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.reps, args.threads)))
        return
    mine, theirs = run_child("numpy", args), run_child("torch", args)
    table, notes = report(mine, theirs, args.threads)
    print(table + "\n\n" + notes)
    write_section(args.doc, "CPU, one vision layer", (
        "Written by `python bench/vision_layer.py`: one EVA ViT-g layer of blip2-opt-2.7b (257 tokens, "
        "width 1408) op by op, miniblip2 (NumPy) against PyTorch on the same random fp32 weights, each in "
        "its own process; medians. It shows where the vision encoder's time goes in the table above.\n\n"
        f"{table}\n\n{notes}\n"))
    print(f"wrote {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
