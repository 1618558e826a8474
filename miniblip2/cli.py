"""The command line: `miniblip2 caption IMAGE [--prompt TEXT] [--weights DIR] [--max-new-tokens N]`
plus the common generation settings (--num-beams, --do-sample, --top-k, --top-p, --temperature,
--repetition-penalty, --seed), named as in transformers."""

import argparse
import os
import sys

from .errors import MiniBlip2Error
from .model import load

WEIGHTS_ENV = "MINIBLIP2_WEIGHTS"  # a default checkpoint folder, so --weights can be left out


def build_parser():
    parser = argparse.ArgumentParser(prog="miniblip2", description="BLIP-2 in NumPy: image in, text out.")
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser("caption", help="caption an image, or answer a question about it")
    cap.add_argument("image", nargs="+", help="image file(s)")
    cap.add_argument("--prompt", help='e.g. "Question: how many cats are there? Answer:"')
    cap.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV),
                     help=f"checkpoint folder (default: ${WEIGHTS_ENV})")
    cap.add_argument("--max-new-tokens", type=int, default=30)
    cap.add_argument("--num-beams", type=int, help="beam search with this many beams")
    cap.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    cap.add_argument("--top-k", type=int)
    cap.add_argument("--top-p", type=float)
    cap.add_argument("--temperature", type=float)
    cap.add_argument("--repetition-penalty", type=float)
    cap.add_argument("--seed", type=int, help="makes sampling reproducible")
    return parser


GENERATION_FLAGS = ("num_beams", "top_k", "top_p", "temperature", "repetition_penalty", "seed")


def generation_arguments(args):
    """The flags that were given, as `generate` keyword arguments."""
    kwargs = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    return kwargs | ({"do_sample": True} if args.do_sample else {})


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not args.weights:
            raise MiniBlip2Error(f"no checkpoint: give --weights DIR or set {WEIGHTS_ENV} "
                                 "(weights/README.md says how to download one)")
        model = load(args.weights)
        texts = model.caption(args.image, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                              **generation_arguments(args))
    except MiniBlip2Error as err:
        print(f"miniblip2: error: {err}", file=sys.stderr)
        return 2
    for path, text in zip(args.image, texts):
        print(text if len(args.image) == 1 else f"{path}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
