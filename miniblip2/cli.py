"""The command line:
    miniblip2 caption IMAGE [--prompt TEXT] [--weights DIR] [--max-new-tokens N]
        [--device cpu|cuda] [--dtype float32|float16|bfloat16]
        plus the common generation settings (--num-beams, --do-sample, --top-k, --top-p,
        --temperature, --repetition-penalty, --seed), named as in transformers
    miniblip2 demo [--seed N] [--out FILE]
        draws a new shapes scene, saves it, and prints its true caption beside the model's
    miniblip2 match IMAGE TEXT [TEXT ...] --weights DIR [--device cpu|cuda] [--dtype ...]
        ranks the texts by how well each describes the image, with an image-text retrieval
        checkpoint (blip2-itm-vit-g): the matching probability (ITM) and the similarity (ITC)
Without --weights (and $MINIBLIP2_WEIGHTS) they use the shapes model shipped in weights/shapes-tiny,
which captions but cannot match.
"""

import argparse
import random
import sys

from . import retrieval, shapes
from .errors import MiniBlip2Error
from .families import load
from .runtime.device import DEVICES
from .runtime.precision import DTYPES
from .shapes.shipped import WEIGHTS_ENV, weights_folder


def build_parser():
    parser = argparse.ArgumentParser(prog="miniblip2", description="BLIP-2 in NumPy: image in, text out.")
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser("caption", help="caption an image, or answer a question about it")
    cap.add_argument("image", nargs="+", help="image file(s)")
    cap.add_argument("--prompt", help='e.g. "Question: how many cats are there? Answer:"')
    cap.add_argument("--weights", help=f"checkpoint folder (default: ${WEIGHTS_ENV}, else the shapes model)")
    cap.add_argument("--max-new-tokens", type=int, default=30)
    cap.add_argument("--num-beams", type=int, help="beam search with this many beams")
    cap.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    cap.add_argument("--top-k", type=int)
    cap.add_argument("--top-p", type=float)
    cap.add_argument("--temperature", type=float)
    cap.add_argument("--repetition-penalty", type=float)
    cap.add_argument("--seed", type=int, help="makes sampling reproducible")
    cap.add_argument("--device", choices=DEVICES, default="cpu",
                     help="where to run; cuda needs CuPy: pip install 'miniblip2[gpu]'")
    cap.add_argument("--dtype", choices=DTYPES, default="float32")
    match = commands.add_parser("match", help="rank texts by how well they describe an image")
    match.add_argument("image", help="image file")
    match.add_argument("texts", nargs="+", metavar="text", help='e.g. "a cat on a sofa" "a dog in the snow"')
    match.add_argument("--weights", help=f"an image-text retrieval checkpoint folder (default: ${WEIGHTS_ENV})")
    match.add_argument("--device", choices=DEVICES, default="cpu")
    match.add_argument("--dtype", choices=DTYPES, default="float32")
    demo = commands.add_parser("demo", help="caption a new scene of coloured shapes, beside its true caption")
    demo.add_argument("--seed", type=int, help="the scene (default: a random held-out one)")
    demo.add_argument("--out", default="shapes-demo.png", help="where to save the picture")
    demo.add_argument("--weights", help=f"checkpoint folder (default: ${WEIGHTS_ENV}, else the shapes model)")
    return parser


GENERATION_FLAGS = ("num_beams", "top_k", "top_p", "temperature", "repetition_penalty", "seed")


def generation_arguments(args):
    """The flags that were given, as `generate` keyword arguments."""
    kwargs = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    return kwargs | ({"do_sample": True} if args.do_sample else {})


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return demo(load(weights_folder(args.weights)), args.seed, args.out)
        model = load(weights_folder(args.weights), dtype=args.dtype, device=args.device)
        if args.command == "match":
            print(retrieval.format_ranking(retrieval.rank_texts(model, args.image, args.texts)))
            return 0
        texts = model.caption(args.image, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                              **generation_arguments(args))
    except MiniBlip2Error as err:
        print(f"miniblip2: error: {err}", file=sys.stderr)
        return 2
    for path, text in zip(args.image, texts):
        print(text if len(args.image) == 1 else f"{path}: {text}")
    return 0


def demo(model, seed, out):
    """Draw a scene the model never saw in training, save it, caption it, answer its questions."""
    seed = random.randrange(shapes.HELD_OUT_SEEDS.start, shapes.HELD_OUT_SEEDS.stop) if seed is None else seed
    image, truth, qa_pairs = shapes.sample(seed)
    try:
        image.save(out)
    except (OSError, ValueError) as err:
        raise MiniBlip2Error(f"could not save the scene to {out} ({err}); give another --out FILE") from err
    predicted = model.caption(image)
    answers = model.caption([image] * len(qa_pairs), prompt=[q for q, _ in qa_pairs])
    print(f"scene {seed}, saved to {out}")
    print(f"  true caption:  {truth}")
    print(f"  model caption: {predicted}  {mark(predicted == truth)}")
    for (question, answer), reply in zip(qa_pairs, answers):
        print(f"  {question} {reply}  {mark(reply == answer)}" + ("" if reply == answer else f" (true: {answer})"))
    return 0


def mark(right: bool) -> str:
    return "right" if right else "WRONG"


if __name__ == "__main__":
    sys.exit(main())
