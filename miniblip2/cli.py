"""The command line:
    miniblip2 caption IMAGE [--prompt TEXT] [--weights DIR] [--max-new-tokens N]
        [--device cpu|cuda] [--dtype float32|float16|bfloat16]
        plus the common generation settings (--num-beams, --do-sample, --top-k, --top-p,
        --temperature, --repetition-penalty, --seed), named as in transformers
    miniblip2 ask IMAGE QUESTION [--weights DIR] and caption's other options
        answers a question about the image: BLIP VQA checkpoints (blip-vqa-base) as asked,
        BLIP-2 ones with the question put in their prompt, "Question: ... Answer:"
    miniblip2 demo [--seed N] [--out FILE]
        draws a new shapes scene, saves it, and prints its true caption beside the model's
    miniblip2 match IMAGE TEXT [TEXT ...] --weights DIR [--device cpu|cuda] [--dtype ...]
        ranks the texts by how well each describes the image, with an image-text retrieval
        checkpoint (blip2-itm-vit-g): the matching probability (ITM) and the similarity (ITC)
Without --weights (and $MINIBLIP2_WEIGHTS) they use the shapes model shipped in weights/shapes-tiny,
which captions but cannot match.
"""

import argparse
import os
import random
import sys

from . import retrieval, shapes
from .errors import MiniBlip2Error
from .families import load
from .runtime.device import DEVICES
from .runtime.precision import DTYPES
from .shapes.shipped import WEIGHTS_ENV, weights_folder


class UsageError(MiniBlip2Error):
    """A command line argparse cannot read: reported in one line like every other error."""


# argparse prints the usage and exits on a bad flag; here it raises, so that main reports it in
# one line like any other bad input. Subcommands' parsers are made of the same class.
class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser():
    parser = Parser(prog="miniblip2", description="BLIP-2 in NumPy: image in, text out.")
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser("caption", help="caption an image, or answer a question about it")
    cap.add_argument("image", nargs="+", help="image file(s)")
    cap.add_argument("--prompt", help='e.g. "Question: how many cats are there? Answer:" (BLIP-2), '
                                      '"a photography of" (BLIP)')
    add_generation_options(cap)
    ask = commands.add_parser("ask", help="answer a question about an image (BLIP VQA or BLIP-2 checkpoints)")
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help='e.g. "how many dogs are in the picture?"')
    add_generation_options(ask)
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


# The flags caption and ask share: the checkpoint, where and how to run it, and transformers'
# generation settings.
def add_generation_options(command):
    command.add_argument("--weights", help=f"checkpoint folder (default: ${WEIGHTS_ENV}, else the shapes model)")
    command.add_argument("--max-new-tokens", type=int, default=30)
    command.add_argument("--num-beams", type=int, help="beam search with this many beams")
    command.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    command.add_argument("--top-k", type=int)
    command.add_argument("--top-p", type=float)
    command.add_argument("--temperature", type=float)
    command.add_argument("--repetition-penalty", type=float)
    command.add_argument("--seed", type=int, help="makes sampling reproducible")
    command.add_argument("--device", choices=DEVICES, default="cpu",
                         help="where to run; cuda needs CuPy: pip install 'miniblip2[gpu]'")
    command.add_argument("--dtype", choices=DTYPES, default="float32")


GENERATION_FLAGS = ("num_beams", "top_k", "top_p", "temperature", "repetition_penalty", "seed")


def generation_arguments(args):
    """The flags that were given, as `generate` keyword arguments."""
    kwargs = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    return kwargs | ({"do_sample": True} if args.do_sample else {})


# Exit codes: 0 done, 2 bad input (one line on stderr saying what to do), 1 a bug in miniblip2
# (one line too; MINIBLIP2_TRACEBACK=1 shows the traceback), 130 interrupted.
def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except MiniBlip2Error as err:
        return report(f"miniblip2: error: {err}", 2)
    except MemoryError as err:
        return report(f"miniblip2: error: out of memory ({err or 'MemoryError'}); use a smaller checkpoint, "
                      "dtype, batch or --max-new-tokens", 2)
    except KeyboardInterrupt:
        return report("miniblip2: interrupted", 130)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # an Exception, or a Rust panic from `tokenizers` (not an Exception)
        if os.environ.get("MINIBLIP2_TRACEBACK"):
            raise
        return report(f"miniblip2: internal error: {type(err).__name__}: {err}. This is a bug in miniblip2; "
                      "please report it (MINIBLIP2_TRACEBACK=1 shows where it happened)", 1)


def run(args):
    if args.command == "demo":
        return demo(load(weights_folder(args.weights)), args.seed, args.out)
    model = load(weights_folder(args.weights), dtype=args.dtype, device=args.device)
    if args.command == "match":
        say(retrieval.format_ranking(retrieval.rank_texts(model, args.image, args.texts)))
        return 0
    if args.command == "ask":
        return ask(model, args)
    texts = model.caption(args.image, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                          **generation_arguments(args))
    for path, text in zip(args.image, texts):
        say(text if len(args.image) == 1 else f"{path}: {text}")
    return 0


# One line on stderr, whatever the message holds (a checkpoint's list of missing weights spans
# lines), in characters the terminal can show (a path from the command line may hold bytes that
# are not valid in its encoding): the message never turns into a UnicodeEncodeError traceback.
def report(message, code):
    say(" ".join(line.strip() for line in message.splitlines() if line.strip()), sys.stderr)
    return code


def say(text, stream=None):
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=stream)


# `ask`: BLIP's VQA models answer the question as it is; BLIP-2 models get it as "Question: ...
# Answer:" (Blip2.answer); a captioning-only or retrieval checkpoint says which ones can answer.
def ask(model, args):
    if not hasattr(model, "answer"):
        raise MiniBlip2Error(f"this checkpoint ({type(model).__name__}) does not write text, so it cannot answer; "
                             "use a BLIP VQA checkpoint (Salesforce/blip-vqa-base) or a BLIP-2 one (blip2-opt-2.7b)")
    say(model.answer(args.image, args.question, max_new_tokens=args.max_new_tokens, **generation_arguments(args)))
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
    say(f"scene {seed}, saved to {out}")
    say(f"  true caption:  {truth}")
    say(f"  model caption: {predicted}  {mark(predicted == truth)}")
    for (question, answer), reply in zip(qa_pairs, answers):
        say(f"  {question} {reply}  {mark(reply == answer)}" + ("" if reply == answer else f" (true: {answer})"))
    return 0


def mark(right: bool) -> str:
    return "right" if right else "WRONG"


if __name__ == "__main__":
    sys.exit(main())
