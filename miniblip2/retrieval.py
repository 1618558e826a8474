"""What every image-text matching model shares (BLIP-2's Blip2ForImageTextRetrieval in
blip2_retrieval.py, BLIP's BlipForImageTextRetrieval in blip_retrieval.py): unit-length
embeddings, and ranking texts against an image.

    l2_normalize    x / ||x|| over the last axis, as torch.nn.functional.normalize
    rank_texts      model.match + model.similarity for one image and several texts -> [Match], best first
    format_ranking  the ranking as the CLI prints it

A model that can rank texts has `match(image, texts)` (ITM: the probability that each text fits
the image) and `similarity(images, texts)` (ITC: [images, texts] cosine scores).

Legend: N texts, D embedding width (256 in blip2-itm-vit-g and blip-itm-base-coco).
"""

from dataclasses import dataclass

from .errors import CheckpointError, PromptError
from .nn import namespace
from .runtime.precision import like_weight


# torch.nn.functional.normalize(x, dim=-1): x / max(||x||, eps). The norm is rounded to the
# dtype of `like` (a weight) before the division, as torch computes it (float32 sums) and then
# stores it, and the quotient is rounded again. In float32 both roundings are no-ops.
def l2_normalize(x, like, eps=1e-12):  # [..., D] -> [..., D]
    xp = namespace(x)
    wide = x.astype(xp.float32, copy=False)
    norm = like_weight(xp.sqrt(xp.sum(wide * wide, axis=-1, keepdims=True)), like)  # [..., 1]
    return like_weight(wide / xp.maximum(norm.astype(xp.float32, copy=False), eps), like)


@dataclass(frozen=True)
class Match:
    text: str
    probability: float  # ITM: softmax(itm logits)[1], how likely the text describes the image
    similarity: float  # ITC: the cosine between the image's and the text's embeddings, in [-1, 1]


# The texts' token counts [N] against the text model's position table (`where` names its config
# key): the first text that does not fit is named, before any product.
def check_text_lengths(texts, lengths, limit, where):
    too_long = [i for i, n in enumerate(lengths.tolist()) if n > limit]
    if too_long:
        i = too_long[0]
        raise PromptError(f"texts[{i}] ({texts[i][:40]!r}...) is {lengths[i]} tokens long, more than the {limit} "
                          f"positions of {where}; shorten it")


def text_list(texts, argument="texts") -> list[str]:
    items = [texts] if isinstance(texts, str) else texts
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise PromptError(f"{argument} must be a str or a list of str; got {type(texts).__name__}.")
    if not items:
        raise PromptError(f"{argument} is an empty list: give at least one text to match against the image.")
    return list(items)


# One image against several texts with both heads, best first: by the matching probability,
# the head trained to judge a pair, ties broken by the similarity.
def rank_texts(model, image, texts) -> list[Match]:
    if not (hasattr(model, "match") and hasattr(model, "similarity")):
        raise CheckpointError(
            f"this checkpoint is a {type(model).__name__}, which cannot match images and texts; load an "
            "image-text retrieval checkpoint (Salesforce/blip2-itm-vit-g, blip2-itm-vit-g-coco, "
            "blip-itm-base-coco or blip-itm-large-coco)")
    texts = text_list(texts)
    probabilities = model.match(image, texts)  # [N]
    similarities = model.similarity(image, texts)[0]  # [N]
    matches = [Match(t, float(p), float(s)) for t, p, s in zip(texts, probabilities, similarities)]
    return sorted(matches, key=lambda m: (m.probability, m.similarity), reverse=True)


def format_ranking(matches: list[Match]) -> str:
    lines = [f"{'match':>7} {'similarity':>10}  text"]
    lines += [f"{m.probability:>7.1%} {m.similarity:>10.4f}  {m.text}" for m in matches]
    return "\n".join(lines)
