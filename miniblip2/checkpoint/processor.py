"""Processor: images and prompts -> the arrays the model takes.

Mirrors transformers' `Blip2Processor` (models/blip_2/processing_blip_2.py) called as
`processor(images=..., text=..., padding=True)`:

    pixel_values    [B, 3, 224, 224] float32   image.preprocess
    input_ids       [B, 32 + T] int64          32 x <image> (50265), then the prompt as the
                                               tokenizer gives it: </s> (2) first, padded with 1
    attention_mask  [B, 32 + T] int64          0 on padding, 1 elsewhere

The 32 `<image>` ids are placeholders: the model overwrites their embeddings with the 32 Q-Former
query outputs (projected to OPT's width). Upstream pads the prompts first and only then puts the
image ids in front, so with left padding the pads sit *between* the image ids and `</s>`:

    left:   <image> x 32, <pad>, <pad>, </s>, Question, :, ...
    right:  <image> x 32, </s>, Question, :, ..., <pad>, <pad>

That gap is harmless: OPT takes positions from the cumulative sum of attention_mask, so the
prompt's positions continue right after the image tokens either way.

Legend: B images = prompts, T prompt tokens incl. BOS, Q num_query_tokens (32).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, PromptError
from .config import read_json
from .image import ImageConfig, preprocess, read_image_config
from .tokenizer import Tokenizer, load_tokenizer, with_image_token


@dataclass(frozen=True)
class Processor:
    image_config: ImageConfig
    tokenizer: Tokenizer
    num_query_tokens: int  # Q = 32: one <image> id per Q-Former query
    image_token_id: int  # 50265

    # `Blip2Processor.__call__(images, text, padding=True, padding_side=...)`.
    def __call__(self, images=None, text=None, padding_side: str = "left") -> dict[str, np.ndarray]:
        """images: one image or a list (see image.load_image); text: one prompt or a list, one per
        image. Returns pixel_values if images are given, input_ids and attention_mask if text is.

        padding_side defaults to "left", what generation needs (every row's last token is then
        real, so new tokens follow the prompt directly); transformers' tokenizer defaults to
        "right". Both are supported and match Blip2Processor given the same side.
        """
        if images is None and text is None:
            raise PromptError("give images, text or both.")
        if padding_side not in ("left", "right"):
            raise PromptError(f"padding_side must be 'left' or 'right', not {padding_side!r}.")
        inputs = {}
        if text is not None:
            prompts = prompt_list(text)
            if images is not None:
                check_counts(images, prompts)
            inputs.update(self.text_inputs(prompts, images is not None, padding_side))
        if images is not None:  # images alone: only pixel_values, as upstream
            inputs["pixel_values"] = preprocess(images, self.image_config)  # [B, 3, 224, 224]
        return inputs

    # The tokenizer half of Blip2Processor.__call__: encode, pad, then the image ids in front.
    def text_inputs(self, prompts: list[str], with_images: bool, padding_side: str) -> dict[str, np.ndarray]:
        rows = [self.tokenizer.encode(prompt) for prompt in prompts]  # B x [T_b]: [2, ...]
        input_ids, attention_mask = pad(rows, self.tokenizer.pad_token_id, padding_side)  # [B, T]
        if with_images:
            input_ids, attention_mask = prepend_image_tokens(
                input_ids, attention_mask, self.image_token_id, self.num_query_tokens)  # [B, Q + T]
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# Upstream accepts a str or a list of str (it checks only the first element; here all of them).
def prompt_list(text) -> list[str]:
    prompts = [text] if isinstance(text, str) else text
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise PromptError(f"text must be a str or a non-empty list of str; got {describe(text)}.")
    return list(prompts)


# Upstream does not check this: one prompt with 3 images gives input_ids [1, T] beside
# pixel_values [3, ...], which fails later inside the model. Say so here instead.
def check_counts(images, prompts: list[str]) -> None:
    n_images = len(images) if isinstance(images, (list, tuple)) else 1
    if n_images != len(prompts):
        raise PromptError(f"{n_images} images but {len(prompts)} prompts; give one prompt per image "
                          f"(for the same prompt on every image: text=[prompt] * {n_images}).")


# "a list of ['int', 'str']": what the caller passed, for the error message.
def describe(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {sorted({type(v).__name__ for v in value}) or 'nothing'}"
    return f"a {type(value).__name__}"


# The tokenizer's `pad(padding=True)`: every row to the longest, pad id 1, mask 0 on padding.
def pad(rows: list[list[int]], pad_token_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(row) for row in rows)  # T
    input_ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)  # [B, T]
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)  # [B, T]
    for b, row in enumerate(rows):
        start = length - len(row) if side == "left" else 0
        input_ids[b, start:start + len(row)] = row
        attention_mask[b, start:start + len(row)] = 1
    return input_ids, attention_mask


# The "hacky manipulation" in Blip2Processor.__call__: Q image ids, unpadded and without BOS,
# go in front of every (already padded) row; their mask is 1.
def prepend_image_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int,
                         num_query_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    batch = input_ids.shape[0]
    image_ids = np.full((batch, num_query_tokens), image_token_id, dtype=np.int64)  # [B, Q]
    ones = np.ones((batch, num_query_tokens), dtype=np.int64)  # [B, Q]
    return np.concatenate([image_ids, input_ids], axis=1), np.concatenate([ones, attention_mask], axis=1)


# `Blip2Processor.from_pretrained(folder)`: only the small files, no weights.
def load_processor(folder) -> Processor:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give the checkpoint folder with the "
                              "tokenizer and preprocessor files.")
    tokenizer = with_image_token(load_tokenizer(folder))  # Blip2Processor.__init__ adds a missing <image>
    return Processor(image_config=read_image_config(folder), tokenizer=tokenizer,
                     num_query_tokens=read_num_query_tokens(folder),
                     image_token_id=read_image_token_id(folder, tokenizer))


# processor_config.json {"num_query_tokens": 32}, else the model's config.json (older folders).
# Upstream leaves it None without processor_config.json and then adds no image ids at all;
# the current model needs them, so a missing value is an error here.
def read_num_query_tokens(folder: Path) -> int:
    for name in ("processor_config.json", "config.json"):
        value = read_json(folder / name).get("num_query_tokens") if (folder / name).is_file() else None
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{folder / name}: num_query_tokens must be a positive int, not {value!r}.")
            return value
    raise CheckpointError(f"{folder}: neither processor_config.json nor config.json gives "
                          "num_query_tokens; download them with the checkpoint.")


# config.json image_token_index (50265), else the tokenizer's <image>. The processor writes the
# tokenizer's id and the model looks for the config's id, so the two must agree.
def read_image_token_id(folder: Path, tokenizer: Tokenizer) -> int:
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    index = config.get("image_token_index")
    if index is not None and index != tokenizer.image_token_id:
        raise CheckpointError(f"{folder}/config.json has image_token_index {index} but the tokenizer's "
                              f"<image> is id {tokenizer.image_token_id}; the files are from different "
                              "checkpoints.")
    return tokenizer.image_token_id
