"""Images per second at several batch sizes: the shipped shapes model (or --weights) captioning.

    python bench/throughput.py                       # batch 1, 8 and 32, 64 held-out scenes each
    python bench/throughput.py --batch-sizes 1 4 --images 16 --weights Salesforce/blip2-opt-2.7b

Each batch size captions the same `--images` scenes (miniblip2.shapes, held-out seeds, drawn
beforehand as PIL images, so neither drawing nor disk is timed) through `model.caption` in
batches, greedy, at most 30 new tokens, after one warm-up batch; `--reps` runs, the median is
reported. This is what `miniblip2 caption DIR --output FILE --batch-size N` does per batch,
less reading the files. The shapes model is small (a 96-px image, a few MB of weights), so its
figures show the batching of the Python loop and the small matrix products, not a real
checkpoint's; give `--weights` for one.

Heavy for the CPU: run it on a quiet machine. `--write` puts the table into docs/BENCHMARKS.md
("## Throughput").
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_section  # noqa: E402

import miniblip2  # noqa: E402
from miniblip2 import shapes  # noqa: E402


def images_per_second(model, images, batch_size, reps, device_sync):
    def run():
        for start in range(0, len(images), batch_size):
            model.caption(images[start:start + batch_size])
        device_sync()
    model.caption(images[:batch_size])  # warm-up: first-call costs (allocations, CuPy kernels) are not timed
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return len(images) / statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="checkpoint folder or hub id (default: the shipped shapes model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--images", type=int, default=64, help="scenes captioned per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--write", action="store_true", help="write the table to --doc")
    args = parser.parse_args(argv)

    model = miniblip2.load(miniblip2.weights_folder(args.weights), dtype=args.dtype, device=args.device)
    images = [shapes.sample(seed)[0] for seed in range(shapes.HELD_OUT_SEEDS.start,
                                                        shapes.HELD_OUT_SEEDS.start + args.images)]
    sync = (lambda: model.xp.cuda.Device().synchronize()) if args.device == "cuda" else (lambda: None)
    rows = []
    for batch_size in args.batch_sizes:
        rate = images_per_second(model, images, batch_size, args.reps, sync)
        rows.append((batch_size, rate))
        print(f"batch {batch_size:>3}: {rate:8.2f} images/s", file=sys.stderr)

    weights = args.weights or "weights/shapes-tiny"
    lines = [f"`python bench/throughput.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`: "
             f"{weights}, {args.dtype} on {args.device}, {args.images} shapes scenes, greedy, at most 30 new tokens, "
             f"median of {args.reps}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"NumPy {__import__('numpy').__version__}.", "",
             "| batch size | images/s | seconds/image | vs batch 1 |", "|---:|---:|---:|---:|"]
    base = rows[0][1]
    lines += [f"| {b} | {rate:.2f} | {1 / rate:.4f} | {rate / base:.2f}x |" for b, rate in rows]
    print("\n".join(lines))
    if args.write:
        write_section(args.doc, "Throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
