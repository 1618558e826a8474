"""Accuracy of the shipped shapes model on held-out scenes, in miniblip2 and in transformers.

    python scripts/eval_shapes.py                    # 500 scenes, miniblip2 and transformers
    python scripts/eval_shapes.py --scenes 50 --no-transformers

Scenes are drawn from shapes.HELD_OUT_SEEDS, which training never used. Captions and answers
are greedy and scored by exact match. With transformers installed, the same weights run in
`Blip2ForConditionalGeneration` on the same arrays, and every text must be the same.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import miniblip2  # noqa: E402
from miniblip2 import shapes  # noqa: E402
from miniblip2.shapes.shipped import SHAPES_TINY  # noqa: E402


class TransformersModel:
    """transformers' Blip2ForConditionalGeneration behind miniblip2's `caption`, fed the arrays
    of miniblip2's processor (identical to Blip2Processor's with the PIL image backend)."""

    def __init__(self, model, processor):
        import torch
        self.torch, self.model, self.processor = torch, model, processor

    @classmethod
    def load(cls, folder, processor):
        import torch
        from transformers import Blip2ForConditionalGeneration
        return cls(Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(), processor)

    def caption(self, images, prompt=None, max_new_tokens=24):
        inputs = self.processor(images=images, text=prompt or [""] * len(images))
        inputs = {k: self.torch.from_numpy(v).to(self.model.device) for k, v in inputs.items()}
        with self.torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:].cpu().numpy()
        return [text.strip() for text in self.processor.tokenizer.batch_decode(new)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=SHAPES_TINY)
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args(argv)
    seeds = range(shapes.HELD_OUT_SEEDS.start, shapes.HELD_OUT_SEEDS.start + args.scenes)

    model = miniblip2.load(args.weights, progress=False)
    start = time.time()
    ours = shapes.evaluate(model, seeds)
    questions = sum(len(a) for a in ours.answers)
    print(f"miniblip2 on {args.scenes} held-out scenes ({questions} questions), {time.time() - start:.0f} s:")
    print(f"  caption exact match {ours.caption_accuracy:.1%}, answers exact match {ours.vqa_accuracy:.1%}")
    for seed, predicted in zip(ours.seeds, ours.captions):
        truth = shapes.sample(seed)[1]
        if predicted != truth:
            print(f"  scene {seed}: {predicted!r}, true {truth!r}")
    if args.no_transformers:
        return 0
    start = time.time()
    theirs = shapes.evaluate(TransformersModel.load(args.weights, model.processor), seeds)
    agree = sum(a == b for a, b in zip(ours.captions, theirs.captions))
    agree_answers = sum(a == b for x, y in zip(ours.answers, theirs.answers) for a, b in zip(x, y))
    print(f"transformers, {time.time() - start:.0f} s: caption {theirs.caption_accuracy:.1%}, "
          f"answers {theirs.vqa_accuracy:.1%}; same text as miniblip2 for {agree}/{args.scenes} captions "
          f"and {agree_answers}/{questions} answers")
    return 0 if agree == args.scenes and agree_answers == questions else 1


if __name__ == "__main__":
    sys.exit(main())
