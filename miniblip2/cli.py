"""The command line:
    miniblip2 caption IMAGE [--prompt TEXT] [--weights DIR|ID] [--max-new-tokens N]
        [--device cpu|cuda] [--dtype float32|float16|bfloat16]
        plus the common generation settings (--num-beams, --do-sample, --top-k, --top-p,
        --temperature, --repetition-penalty, --seed), named as in transformers
    miniblip2 ask IMAGE QUESTION [--weights DIR|ID] and caption's other options
        answers a question about the image: BLIP VQA checkpoints (blip-vqa-base) as asked,
        BLIP-2 ones with the question put in their prompt, "Question: ... Answer:"
    miniblip2 demo [--seed N] [--out FILE]
        draws a new shapes scene, saves it, and prints its true caption beside the model's
    miniblip2 match IMAGE TEXT [TEXT ...] --weights DIR|ID [--device cpu|cuda] [--dtype ...]
        ranks the texts by how well each describes the image, with an image-text retrieval
        checkpoint (blip2-itm-vit-g, blip-itm-base-coco): the matching probability (ITM) and the
        similarity (ITC)
    miniblip2 download ID [--dir DIR]
        fetches a checkpoint from the Hugging Face hub, only the files miniblip2 reads (hub.py)
Without --weights (and $MINIBLIP2_WEIGHTS) they use the shapes model shipped in weights/shapes-tiny,
which captions but cannot match. --weights takes a folder or a hub id (Salesforce/blip2-opt-2.7b),
found in the Hugging Face cache or downloaded into it.

caption, ask and match with --output FILE.jsonl take many images (folders, quoted glob patterns,
files, or --prompts FILE.jsonl with a prompt per image) and write one JSON line per image as they
go, in batches of --batch-size; a rerun resumes (batch.py).
"""

import argparse
import os
import random
import sys

from . import batch, hub, retrieval, shapes
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
    cap.add_argument("image", nargs="*", help="image file(s); with --output also folders and quoted glob patterns")
    cap.add_argument("--prompt", help='e.g. "Question: how many cats are there? Answer:" (BLIP-2), '
                                      '"a photography of" (BLIP)')
    add_generation_options(cap)
    add_output_options(cap, '{"image": ..., "prompt": ...}')
    ask = commands.add_parser("ask", help="answer a question about an image (BLIP VQA or BLIP-2 checkpoints)",
                              usage="miniblip2 ask IMAGE [IMAGE ...] QUESTION [options]\n"
                                    "       miniblip2 ask --prompts FILE --output FILE [QUESTION] [options]")
    ask.add_argument("image", nargs="*", metavar="IMAGE ... QUESTION",
                     help='image file(s) (with --output also folders and quoted glob patterns), then the question, '
                          'e.g. "how many dogs are in the picture?"')
    add_generation_options(ask)
    add_output_options(ask, '{"image": ..., "question": ...}')
    match = commands.add_parser("match", help="rank texts by how well they describe an image",
                                usage="miniblip2 match IMAGE TEXT [TEXT ...] [options]\n"
                                      "       miniblip2 match --prompts FILE --output FILE [TEXT ...] [options]")
    match.add_argument("image", nargs="?", help="image file (with --output also a folder or a quoted glob pattern)")
    match.add_argument("texts", nargs="*", metavar="text", help='e.g. "a cat on a sofa" "a dog in the snow"')
    match.add_argument("--weights", help=f"an image-text retrieval checkpoint folder or hub id "
                                         f"(default: ${WEIGHTS_ENV})")
    match.add_argument("--device", choices=DEVICES, default="cpu")
    match.add_argument("--dtype", choices=DTYPES, default="float32")
    add_output_options(match, '{"image": ..., "texts": [...]}')
    demo = commands.add_parser("demo", help="caption a new scene of coloured shapes, beside its true caption")
    demo.add_argument("--seed", type=int, help="the scene (default: a random held-out one)")
    demo.add_argument("--out", default="shapes-demo.png", help="where to save the picture")
    demo.add_argument("--weights", help=f"checkpoint folder or hub id (default: ${WEIGHTS_ENV}, else the shapes model)")
    download = commands.add_parser("download", help="download a checkpoint from the Hugging Face hub (only the "
                                                     "files miniblip2 reads) and print its folder")
    download.add_argument("id", help="a hub id, e.g. Salesforce/blip2-opt-2.7b")
    download.add_argument("--dir", help="the folder to put it in (default: the Hugging Face cache, where "
                                        "--weights ID finds it)")
    return parser


# The flags caption and ask share: the checkpoint, where and how to run it, and transformers'
# generation settings.
def add_generation_options(command):
    command.add_argument("--weights", help=f"checkpoint folder or hub id (default: ${WEIGHTS_ENV}, else the "
                                           "shapes model)")
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


# Many images to a JSON Lines file (batch.py).
def add_output_options(command, line):
    command.add_argument("--output", metavar="FILE", help="write one JSON line per image to FILE as it goes; a rerun "
                                                          "skips the images already there")
    command.add_argument("--batch-size", type=int, metavar="N", help=f"images per model call with --output "
                                                                      f"(default {BATCH_SIZE})")
    command.add_argument("--prompts", metavar="FILE", help=f"with --output: a JSON Lines file of {line}, one a line "
                                                           "(image paths relative to FILE)")


BATCH_SIZE = 8
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
    except KeyboardInterrupt as err:
        return report("miniblip2: interrupted" + (f"; {err}" if str(err) else ""), 130)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # an Exception, or a Rust panic from `tokenizers` (not an Exception)
        if os.environ.get("MINIBLIP2_TRACEBACK"):
            raise
        return report(f"miniblip2: internal error: {type(err).__name__}: {err}. This is a bug in miniblip2; "
                      "please report it (MINIBLIP2_TRACEBACK=1 shows where it happened)", 1)


def run(args):
    if args.command == "download":
        say(str(hub.download(args.id, args.dir)))
        return 0
    if args.command == "demo":
        return demo(load(weights_folder(args.weights)), args.seed, args.out)
    requests = output_requests(args) if args.output else single_inputs(args)  # bad input: said before loading
    weights = weights_folder(args.weights)
    model = load(weights, dtype=args.dtype, device=args.device)
    if args.output:
        return write_output(model, args, requests, weights)
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


# Without --output: one image (caption: one or more files) on the command line, as always.
def single_inputs(args):
    for flag in ("prompts", "batch_size"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} needs --output FILE (see `miniblip2 {args.command} --help`)")
    see = f" (see `miniblip2 {args.command} --help`)"
    if args.command == "caption" and not args.image:
        raise UsageError("the following arguments are required: image (or --output FILE with folders, quoted glob "
                         "patterns or --prompts FILE)" + see)
    if args.command == "ask":
        if len(args.image) < 2:
            raise UsageError("the following arguments are required: an image and a question, e.g. "
                             "miniblip2 ask cat.jpg \"how many cats are there?\"" + see)
        args.image, args.question = args.image[:-1], args.image[-1]
    if args.command == "match" and (args.image is None or not args.texts):
        missing = "text" if args.image else "image, text"
        raise UsageError(f"the following arguments are required: {missing}, e.g. "
                         "miniblip2 match cat.jpg \"a cat\" \"a dog\"" + see)
    return None


# With --output: the requests, from the command line (folders, patterns, files) or --prompts.
def output_requests(args):
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive int; got {args.batch_size}")
    positional = [args.image] * (args.image is not None) + args.texts if args.command == "match" else args.image
    if args.prompts is not None:
        field = {"caption": "prompt", "ask": "question", "match": "texts"}[args.command]
        if (args.command == "ask" and len(positional) > 1) or (args.command == "caption" and positional):
            also = " (ask takes one QUESTION for the lines that have none)" if args.command == "ask" else ""
            raise UsageError(f"give the images either on the command line or in --prompts {args.prompts}, not both"
                             + also)
        if args.command == "caption":  # what the lines without their own input get
            default = args.prompt
        else:
            default = (positional[0] if args.command == "ask" else tuple(positional)) if positional else None
        return batch.read_requests(args.prompts, field, default)
    if args.command == "caption":
        if not positional:
            raise UsageError("caption --output needs images: folders, quoted glob patterns or files "
                             "(or --prompts FILE)")
        return batch.requests_for(batch.image_files(positional), prompt=args.prompt)
    if len(positional) < 2:
        raise UsageError(f"{args.command} --output needs images and " + (
            "a question: miniblip2 ask photos/ \"what is this?\" --output answers.jsonl" if args.command == "ask" else
            "texts: miniblip2 match photos/ \"a cat\" \"a dog\" --output matches.jsonl"))
    if args.command == "ask":
        return batch.requests_for(batch.image_files(positional[:-1]), question=positional[-1])
    return batch.requests_for(batch.image_files(positional[:1]), texts=tuple(positional[1:]))


def write_output(model, args, requests, weights):
    settings = {"weights": str(weights), "dtype": args.dtype}
    if args.command == "match":
        work = batch.matcher(model)  # a model that cannot match says so at the first image, and stops the run
    else:
        settings |= {"max_new_tokens": args.max_new_tokens} | generation_arguments(args)
        if args.command == "ask":
            can_answer(model)
        make = batch.answerer if args.command == "ask" else batch.captioner
        work = make(model, args.max_new_tokens, **generation_arguments(args))
    try:
        summary = batch.write_jsonl(requests, args.output, work, settings,
                                    BATCH_SIZE if args.batch_size is None else args.batch_size)
    except OSError as err:
        raise MiniBlip2Error(f"cannot write {args.output} ({err.strerror or err}); give another --output") from err
    except KeyboardInterrupt:  # main says it in its one line
        raise KeyboardInterrupt(f"{args.output} holds every line written so far: run the same command to go "
                                "on") from None
    say(f"miniblip2: {summary.written} written, {summary.errors} error(s), {summary.skipped} already done, "
        f"of {summary.total}: {args.output}", sys.stderr)
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
    can_answer(model)
    answers = model.answer(args.image, args.question, max_new_tokens=args.max_new_tokens, **generation_arguments(args))
    for path, text in zip(args.image, answers):
        say(text if len(args.image) == 1 else f"{path}: {text}")
    return 0


def can_answer(model):
    if not hasattr(model, "answer"):
        raise MiniBlip2Error(f"this checkpoint ({type(model).__name__}) does not write text, so it cannot answer; "
                             "use a BLIP VQA checkpoint (Salesforce/blip-vqa-base) or a BLIP-2 one (blip2-opt-2.7b)")


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
