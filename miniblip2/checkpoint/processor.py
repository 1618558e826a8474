"""Processor: images and prompts -> the arrays the model takes.

Mirrors transformers' `Blip2Processor` (models/blip_2/processing_blip_2.py) called as
`processor(images=..., text=..., padding=True)`:

    pixel_values    [B, 3, 224, 224] float32   image.preprocess
    input_ids       [B, 32 + T] int64          32 x <image>, then the prompt as the tokenizer
                                               gives it, padded:
                                                 OPT: <image> 50265, </s> (2) first, pad 1
                                                 T5:  <image> 32100, </s> (1) last, pad 0
    attention_mask  [B, 32 + T] int64          0 on padding, 1 elsewhere

The 32 `<image>` ids are placeholders: the model overwrites their embeddings with the 32 Q-Former
query outputs (projected to the language model's width). Upstream pads the prompts first and only
then puts the image ids in front, so with left padding the pads sit *between* the image ids and
the prompt:

    left:   <image> x 32, <pad>, <pad>, </s>, Question, :, ...      (OPT's default here)
    right:  <image> x 32, Question, :, ..., </s>, <pad>, <pad>      (T5's default; transformers')

The default side follows the checkpoint's language model (config.json, see read_padding_side):
- OPT, decoder-only: left. Generation appends to every row, so each row's last token must be
  real. The gap is harmless: OPT takes positions from the cumulative sum of attention_mask, so
  the prompt's positions continue right after the image tokens either way.
- Flan-T5, encoder-decoder: right, as transformers pads. The encoder reads the prompt once and
  the decoder starts afresh, so nothing is appended; and T5's relative position buckets depend
  on the distance between tokens, so a gap of pads between the image tokens and the prompt
  would change the encoding, while pads at the end (masked out) leave it as unpadded.

Legend: B images = prompts, T prompt tokens incl. BOS (OPT) or EOS (T5), Q num_query_tokens (32).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ImageError, PromptError
from .config import read_json
from .image import ImageConfig, preprocess, read_image_config
from .loading import checkpoint_folder
from .tokenizer import Tokenizer, load_tokenizer, with_image_token


@dataclass(frozen=True)
class Processor:
    image_config: ImageConfig
    tokenizer: Tokenizer
    num_query_tokens: int  # Q = 32: one <image> id per Q-Former query
    image_token_id: int  # OPT 50265, T5 32100
    padding_side: str = "left"  # the default: "left" for OPT, "right" for T5 (read_padding_side)

    # `Blip2Processor.__call__(images, text, padding=True, padding_side=...)`.
    def __call__(self, images=None, text=None, padding_side: str | None = None) -> dict[str, np.ndarray]:
        """images: one image or a list (see image.load_image); text: one prompt or a list, one per
        image. Returns pixel_values if images are given, input_ids and attention_mask if text is.

        padding_side defaults to the checkpoint's (self.padding_side): "left" for OPT, what
        generation needs (every row's last token is then real, so new tokens follow the prompt
        directly); "right" for Flan-T5, transformers' default for both. Both sides are
        supported and match Blip2Processor given the same side.
        """
        padding_side = self.padding_side if padding_side is None else padding_side
        if images is None and text is None:
            raise PromptError("give images, text or both.")
        if isinstance(images, (list, tuple)) and not images:
            raise ImageError("images is an empty list; give one image or a non-empty list of images.")
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
        rows = [self.tokenizer.encode(prompt) for prompt in prompts]  # B x [T_b]: OPT [2, ...], T5 [..., 1]
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


# The tokenizer's `pad(padding=True)`: every row to the longest, pad id (OPT 1, T5 0), mask 0 on padding.
def pad(rows: list[list[int]], pad_token_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(row) for row in rows)  # T
    input_ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)  # [B, T]
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)  # [B, T]
    for b, row in enumerate(rows):
        start = length - len(row) if side == "left" else 0
        input_ids[b, start:start + len(row)] = row
        attention_mask[b, start:start + len(row)] = 1
    return input_ids, attention_mask


# The "hacky manipulation" in Blip2Processor.__call__: Q image ids, unpadded and without BOS or EOS,
# go in front of every (already padded) row; their mask is 1.
def prepend_image_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int,
                         num_query_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    batch = input_ids.shape[0]
    image_ids = np.full((batch, num_query_tokens), image_token_id, dtype=np.int64)  # [B, Q]
    ones = np.ones((batch, num_query_tokens), dtype=np.int64)  # [B, Q]
    return np.concatenate([image_ids, input_ids], axis=1), np.concatenate([ones, attention_mask], axis=1)


# `Blip2Processor.from_pretrained(folder)`: only the small files, no weights.
def load_processor(folder) -> Processor:
    folder = checkpoint_folder(folder)  # a missing path, a file, a URL or a hub id: said so
    tokenizer = with_image_token(load_tokenizer(folder))  # Blip2Processor.__init__ (re)adds <image> as special
    return Processor(image_config=read_image_config(folder), tokenizer=tokenizer,
                     num_query_tokens=read_num_query_tokens(folder),
                     image_token_id=read_image_token_id(folder, tokenizer),
                     padding_side=read_padding_side(folder))


# `BlipProcessor` (models/blip/processing_blip.py): BLIP's image processor and BERT's tokenizer
# side by side, with nothing between them: no image placeholders (BLIP's text model reads the
# image through cross-attention), padding on the right (BertTokenizer's side), no token_type_ids,
# and no `<image>` token added to the tokenizer. For blip-image-captioning-base:
#     pixel_values    [B, 3, 384, 384] float32
#     input_ids       [B, T] int64     [CLS] 101, the text, [SEP] 102, padded with [PAD] 0
#     attention_mask  [B, T] int64     0 on padding
@dataclass(frozen=True)
class BlipProcessor(Processor):
    num_query_tokens: int = 0
    image_token_id: int | None = None
    padding_side: str = "right"

    def text_inputs(self, prompts: list[str], with_images: bool, padding_side: str) -> dict[str, np.ndarray]:
        rows = [self.tokenizer.encode(prompt) for prompt in prompts]  # B x [T_b]: [101, ..., 102]
        input_ids, attention_mask = pad(rows, self.tokenizer.pad_token_id, padding_side)  # [B, T]
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# `BlipProcessor.from_pretrained(folder)`: preprocessor_config.json (or the v5 processor_config.json
# entry) and the BERT tokenizer, as they are.
def load_blip_processor(folder) -> BlipProcessor:
    folder = checkpoint_folder(folder)  # a missing path, a file, a URL or a hub id: said so
    return BlipProcessor(image_config=read_image_config(folder), tokenizer=load_tokenizer(folder))


# Whether the folder has the files load_processor needs beyond the model's: a tokenizer.
def has_processor_files(folder) -> bool:
    folder = Path(folder)
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "vocab.txt"))


# Blip2Processor for the Q-Former's own text (blip2-itm-vit-g): BERT's tokenizer, padding on the
# right as BertTokenizer does, and image placeholders in front only if the model strips them
# (config.json image_token_index). blip2-itm-vit-g has no image_token_index and no
# processor_config.json, so upstream puts none either; the model's config decides here, so that
# the processor and the model cannot disagree.
def load_retrieval_processor(folder, num_query_tokens: int, image_token_index: int | None) -> Processor:
    tokenizer = with_image_token(load_tokenizer(folder))  # Blip2Processor.__init__ adds <image> (30523)
    return Processor(image_config=read_image_config(folder), tokenizer=tokenizer,
                     num_query_tokens=0 if image_token_index is None else num_query_tokens,
                     image_token_id=tokenizer.image_token_id if image_token_index is None else image_token_index,
                     padding_side="right")


# The default padding side, from config.json: "left" before a decoder-only language model (OPT),
# "right" before an encoder-decoder one (T5). Blip2Config stores use_decoder_only_language_model;
# a config without it is told by text_config.model_type, whose default is "opt", and so is a
# folder with no config.json.
def read_padding_side(folder: Path) -> str:
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    decoder_only = config.get("use_decoder_only_language_model")
    if decoder_only is not None and not isinstance(decoder_only, bool):
        raise CheckpointError(f"{folder}/config.json: use_decoder_only_language_model = {decoder_only!r}: expected "
                              "true or false; fix or re-download config.json")
    if decoder_only is None:
        text = config.get("text_config")
        decoder_only = (text.get("model_type", "opt") if isinstance(text, dict) else "opt") != "t5"
    return "left" if decoder_only else "right"


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
