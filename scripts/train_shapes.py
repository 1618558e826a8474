"""Train the small BLIP-2 shipped in weights/shapes-tiny on the shapes world (miniblip2.shapes).

    pip install -e '.[test]'   # torch and transformers 5.23.0: for training only
    python scripts/train_shapes.py weights/shapes-tiny --batch-size 128 --workers 14   # on a GPU
    python scripts/train_shapes.py more --init weights/shapes-tiny --first-step 21000 ...  # go on

README.md ("The shapes world") gives the three runs that made the shipped weights, and
training_log.json beside them every command, machine and validation score.

The model is transformers' own Blip2ForConditionalGeneration (an EVA-style ViT, a Q-Former with
cross-attention every other layer, an OPT decoder), small, trained from scratch with PyTorch,
and saved in the hub layout with an OPT-style tokenizer, so that miniblip2 loads it through the
same code as Salesforce/blip2-opt-2.7b. Inference never needs torch.

Every step draws fresh scenes: step s uses seeds [s * batch, (s + 1) * batch), far below
shapes.HELD_OUT_SEEDS, on which the model is evaluated. Each scene gives one training text:
its caption (no prompt, as BLIP-2 captions) or a few of its questions with their answers. The
loss is on the answers and the closing "\\n" only, which is where generation stops (as in OPT).
"""

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval_shapes import TransformersModel  # noqa: E402  (scripts/eval_shapes.py)

from miniblip2 import shapes  # noqa: E402
from miniblip2.checkpoint.processor import load_processor, pad  # noqa: E402
from miniblip2.testing.tiny_tokenizer import build_tiny_processor_files, build_tiny_tokenizer  # noqa: E402

NUM_QUERY_TOKENS = 8
PATCH_SIZE = 16  # shapes' 32 px cells are 2 x 2 patches
CAPTION_SHARE = 0.4  # of the training texts; the rest are question/answer pairs (--caption-share)
QUESTIONS_PER_TEXT = 4  # asked in one text, so one pass through the vision tower teaches several answers
QUESTION_KINDS = ("what color", "what size", "where is", "how many", "is there")
IGNORE = -100  # label of a position that is not scored
COLORS, SIZES = list(shapes.COLORS), list(shapes.SIZES)


def model_config(vocab_size: int, eos_token_id: int) -> Blip2Config:
    """BLIP-2's architecture, narrow and shallow: 96 px images in 16 px patches (2 x 2 patches
    to a cell of the shapes world), 8 queries."""
    return Blip2Config(
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           image_size=shapes.IMAGE_SIZE, patch_size=PATCH_SIZE),
        qformer_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            cross_attention_frequency=2, encoder_hidden_size=128, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        text_config=dict(model_type="opt", vocab_size=vocab_size, hidden_size=128, ffn_dim=512,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
                         word_embed_proj_dim=128, eos_token_id=eos_token_id, dropout=0.0,
                         attention_dropout=0.0),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=vocab_size - 1)


@torch.no_grad()
def initialize(model) -> None:
    """Draw every weight afresh. transformers 5.23 expects pretrained weights and leaves a new
    Blip2ForConditionalGeneration barely initialised: the vision tower at std 1e-10, some layer
    norm scales at 0, the queries at 0 (identical queries get identical gradients and stay one
    query). Here, as BERT, ViT and OPT are initialised: N(0, 0.02), layer norms 1 and 0, biases 0.
    Position embeddings are drawn at the scale of a patch's embedding (about 0.4), so that where
    a patch sits is visible from the first step: a circle and a square differ only at their edges."""
    for name, p in model.named_parameters():
        if "norm" in name.lower():  # LayerNorm, layer_norm1, post_layernorm, final_layer_norm, ...
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02)
    model.vision_model.embeddings.position_embedding.normal_(0.0, 0.4)


def write_tokenizer_and_processor(out: Path) -> tuple[int, int]:
    """The OPT-style tokenizer trained on the world's texts (every word becomes one token), and
    the preprocessor/processor files. Returns (vocab size, id of "\\n")."""
    vocab_size = build_tiny_tokenizer(out, corpus=shapes.corpus(range(5000)))
    build_tiny_processor_files(out, shapes.IMAGE_SIZE, NUM_QUERY_TOKENS)
    newline = json.loads((out / "vocab.json").read_text(encoding="utf-8"))["\u010a"]  # "Ċ" = byte 10
    return vocab_size, newline


def training_text(seed: int, caption_share: float, questions: int, focus=(), focus_share=0.0) -> list[tuple[str, bool]]:
    """One scene's text as (piece, scored) pieces: its caption with no prompt (as BLIP-2
    captions), or some of its questions, one per line ("Question: ... Answer: red\\n
    Question: ..."), with the answers and each line's "\\n" scored. "\\n" ends generation, so a
    single question at inference is answered exactly as the first line of this text.
    A `focus_share` of the question texts ask only the kinds in `focus` ("what color", ...)."""
    _, caption, qa_pairs = shapes.sample(seed)
    pick = random.Random(-1 - seed)  # a stream of its own, so the scene stays shapes.sample(seed)
    if pick.random() < caption_share:
        return [(caption + "\n", True)]
    if pick.random() < focus_share:
        qa_pairs = [(q, a) for q, a in qa_pairs if question_kind(q) in focus]
    pieces = []
    for question, answer in pick.sample(qa_pairs, min(questions, len(qa_pairs))):
        pieces += [(question, False), (f" {answer}\n", True)]
    return pieces


def question_kind(question: str) -> str:
    """ "Question: what color is the circle? Answer:" -> "what color"; or "what size", "where is",
    "how many", "is there"."""
    return " ".join(question.split()[1:3])


def batch(seeds, processor, caption_share=CAPTION_SHARE, questions=QUESTIONS_PER_TEXT, focus=(),
          focus_share=0.0) -> dict[str, torch.Tensor]:
    """Pixel values, and right-padded ids with labels on the answers and their "\\n" only."""
    tokenizer, rows, labels = processor.tokenizer, [], []
    image_ids = [processor.image_token_id] * processor.num_query_tokens
    for seed in seeds:
        text, ids, label = "", tokenizer.encode(""), [IGNORE] * (len(image_ids) + 1)  # <image> x Q, </s>
        for piece, scored in training_text(seed, caption_share, questions, focus, focus_share):
            text += piece
            longer = tokenizer.encode(text)
            assert longer[:len(ids)] == ids, text  # pieces start at a word: earlier ids do not change
            label += longer[len(ids):] if scored else [IGNORE] * (len(longer) - len(ids))
            ids = longer
        rows.append(image_ids + ids)
        labels.append(label)
    input_ids, attention_mask = pad(rows, tokenizer.pad_token_id, "right")
    label_ids, _ = pad(labels, IGNORE, "right")
    pixel_values = processor(images=[shapes.sample(s)[0] for s in seeds])["pixel_values"]
    arrays = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=label_ids)
    return {name: torch.from_numpy(array) for name, array in arrays.items()} | {"attributes": attributes(seeds)}


def attributes(seeds) -> torch.Tensor:  # [B, 2 * shapes]: each shape's colour, then each shape's size
    """What the auxiliary probe (--probe-loss) reads from the query outputs: for every shape, the
    colour and the size of the object of that shape, or "absent" (the last class of each)."""
    rows = []
    for seed in seeds:
        by_shape = {o.shape: o for o in shapes.objects(seed)}
        rows.append([COLORS.index(by_shape[s].color) if s in by_shape else len(COLORS) for s in shapes.SHAPES] +
                    [SIZES.index(by_shape[s].size) if s in by_shape else len(SIZES) for s in shapes.SHAPES])
    return torch.tensor(rows)


class AttributeProbe(torch.nn.Module):
    """A linear readout from all the query outputs to every shape's colour and size: as a second
    loss in training, it asks the Q-Former to keep each colour and size bound to its shape, which
    the questions need and the captions (which go object by object) do not. Not saved."""

    def __init__(self, width: int):
        super().__init__()
        self.colors = torch.nn.Linear(NUM_QUERY_TOKENS * width, len(shapes.SHAPES) * (len(COLORS) + 1))
        self.sizes = torch.nn.Linear(NUM_QUERY_TOKENS * width, len(shapes.SHAPES) * (len(SIZES) + 1))

    def loss(self, query_output, attributes):  # [B, Q, D], [B, 2 * shapes] -> cross-entropy
        features, count = query_output.flatten(1), len(shapes.SHAPES)
        colors = self.colors(features).view(len(features), count, -1)
        sizes = self.sizes(features).view(len(features), count, -1)
        return (torch.nn.functional.cross_entropy(colors.transpose(1, 2), attributes[:, :count]) +
                torch.nn.functional.cross_entropy(sizes.transpose(1, 2), attributes[:, count:])) / 2


class StepBatches(torch.utils.data.Dataset):
    """Batch number `step` is the scenes [step * size, (step + 1) * size): drawn by DataLoader
    workers while the model trains, the same batches whatever the number of workers."""

    def __init__(self, steps: range, size: int, processor, **mix):
        self.steps, self.size, self.processor, self.mix = steps, size, processor, mix

    def __len__(self):
        return len(self.steps)

    def __getitem__(self, i):
        step = self.steps[i]
        return batch(range(step * self.size, (step + 1) * self.size), self.processor, **self.mix)


@torch.no_grad()
def grow_decoder(model, layers: int):
    """The same model with `layers` more OPT decoder layers on top. Each new layer's attention
    output and second feed-forward matrix start at zero, so it adds nothing to the residual
    stream: the grown model answers exactly as the old one until training moves them."""
    config = model.config
    config.text_config.num_hidden_layers += layers
    grown = Blip2ForConditionalGeneration(config)
    initialize(grown)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".decoder.layers." in key for key in missing), (missing, unexpected)
    for layer in grown.language_model.model.decoder.layers[-layers:]:
        for output in (layer.self_attn.out_proj, layer.fc2):
            output.weight.zero_()
            output.bias.zero_()
    return grown.train()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def accuracy(model, processor, seeds) -> tuple[float, float, dict[str, float]]:
    """Exact-match caption and answer accuracy with transformers' greedy generate, and the
    answer accuracy by kind of question ("what color", "where is", "is there", ...)."""
    model.eval()
    scores = shapes.evaluate(TransformersModel(model, processor), seeds)
    model.train()
    right = {}
    for seed, answers in zip(scores.seeds, scores.answers):
        for (question, truth), answer in zip(shapes.sample(seed)[2], answers):
            right.setdefault(question_kind(question), []).append(answer == truth)
    return scores.caption_accuracy, scores.vqa_accuracy, {kind: sum(r) / len(r) for kind, r in right.items()}


def machine_name(args) -> str:
    if args.device != "cpu":
        return f"{torch.cuda.get_device_name(args.device)}, {args.workers} data workers"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or platform.machine()}, {args.threads} thread(s)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the checkpoint to")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--caption-share", type=float, default=CAPTION_SHARE)
    parser.add_argument("--questions-per-text", type=int, default=QUESTIONS_PER_TEXT)
    parser.add_argument("--focus", nargs="+", default=[], choices=QUESTION_KINDS,
                        help="kinds of question that --focus-share of the question texts ask only")
    parser.add_argument("--focus-share", type=float, default=0.0)
    parser.add_argument("--grow-decoder", type=int, default=0, metavar="N",
                        help="with --init: add N decoder layers on top, each starting as the identity")
    parser.add_argument("--probe-loss", type=float, default=0.0, metavar="WEIGHT",
                        help="add this times the loss of a linear probe for each shape's colour and size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="processes that draw the scenes (0: the training one)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--init", type=Path, help="go on training this checkpoint (same tokenizer) instead of a new one")
    parser.add_argument("--first-step", type=int, default=0,
                        help="number the steps from here, so that a continued run draws seeds it has not seen")
    args = parser.parse_args(argv)
    steps = range(args.first_step, args.first_step + args.steps)
    assert steps.stop * args.batch_size < shapes.HELD_OUT_SEEDS.start, "training would reach held-out seeds"

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    vocab_size, newline = write_tokenizer_and_processor(args.out)
    processor = load_processor(args.out)
    if args.init:
        model = Blip2ForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32).train()
        assert model.config.text_config.vocab_size == vocab_size, "the tokenizer must be the same"
        if args.grow_decoder:
            model = grow_decoder(model, args.grow_decoder)
    else:
        model = Blip2ForConditionalGeneration(model_config(vocab_size, newline)).train()
        initialize(model)
    model.config._attn_implementation = "eager"
    model.to(args.device)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {vocab_size}", flush=True)

    probe = AttributeProbe(model.config.qformer_config.hidden_size).to(args.device)
    trained = list(model.parameters()) + (list(probe.parameters()) if args.probe_loss else [])
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    validation = range(shapes.HELD_OUT_SEEDS.stop, shapes.HELD_OUT_SEEDS.stop + 30)  # not the test seeds
    log, start, running = [], time.time(), None
    mix = dict(caption_share=args.caption_share, questions=args.questions_per_text, focus=args.focus,
               focus_share=args.focus_share)
    batches = torch.utils.data.DataLoader(StepBatches(steps, args.batch_size, processor, **mix), batch_size=None,
                                          num_workers=args.workers, pin_memory=args.device != "cpu")
    for step, inputs in zip(steps, batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - steps.start, args.steps, args.lr, args.warmup)
        inputs = {name: t.to(args.device, non_blocking=True) for name, t in inputs.items()}
        attributes_of_scenes = inputs.pop("attributes")
        outputs = model(**inputs)
        loss = outputs.loss
        if args.probe_loss:
            loss = loss + args.probe_loss * probe.loss(outputs.qformer_outputs.last_hidden_state, attributes_of_scenes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1:5d}  loss {running:.4f}  {time.time() - start:6.0f} s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps.stop:
            captions, answers, by_kind = accuracy(model, processor, validation)
            log.append(dict(step=step + 1, loss=round(running, 5), seconds=round(time.time() - start),
                            caption_accuracy=captions, vqa_accuracy=answers))
            kinds = "  ".join(f"{kind} {share:.0%}" for kind, share in by_kind.items())
            print(f"step {step + 1:5d}  validation: captions {captions:.1%}  answers {answers:.1%}  ({kinds})",
                  flush=True)
            model.save_pretrained(args.out)  # a long run that is stopped early still leaves a model
            write_log(args, argv, time.time() - start, log)
    print(f"trained in {(time.time() - start) / 60:.1f} min; wrote {args.out}")


def write_log(args, argv, seconds: float, log: list[dict]) -> None:
    record = dict(command=shlex.join(["python", "scripts/train_shapes.py"] + (argv or sys.argv[1:])),
                  seconds=round(seconds), machine=machine_name(args),
                  torch=torch.__version__, log=log)
    if args.init and (args.init / "training_log.json").is_file():  # the whole history, first run first
        record = dict(continues=json.loads((args.init / "training_log.json").read_text()), **record)
    (args.out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
