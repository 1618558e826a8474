"""Tokenizer: prompt text <-> token ids, the OPT byte-level BPE that blip2-opt-2.7b uses.

Mirrors transformers' `GPT2Tokenizer` (models/gpt2/tokenization_gpt2.py, on the
`TokenizersBackend` of tokenization_utils_tokenizers.py) as `Blip2Processor` uses it. The BPE
itself runs in Hugging Face's `tokenizers` library, as it does in transformers; this file only
assembles the same pipeline from the checkpoint's files:

    text -> added tokens split out ("<image>", "</s>", "<pad>" are matched as whole strings)
         -> ByteLevel pre-tokenizer (GPT-2 regex; every byte becomes a printable character,
            a space becomes "Ġ", "\\n" becomes "Ċ"; add_prefix_space=False)
         -> BPE merges (50,000 of them) -> ids
         -> post-processor: "</s> $A", i.e. BOS id 2 first, nothing appended
    ids  -> ByteLevel decoder -> text (special added tokens skipped on request)

Quirks of the OPT files (CHECKPOINTS.md 1.3): BOS and EOS are the same token `</s>` = 2, PAD is
`<pad>` = 1, ids follow fairseq's order (not GPT-2's), and `<image>` = 50265 is an extra special
token after the 50,265 BPE entries. The model's own EOS for generation is "\\n" (50118) and
lives in its config, not here.

Legend: B prompts in a batch, T tokens.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from ..errors import CheckpointError, PromptError
from .config import read_json

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Tokenizer:
    backend: Backend  # the `tokenizers` pipeline: merges, pre-tokenizer, decoder, post-processor
    bos_token_id: int  # 2 = "</s>": OPT starts every text with it
    eos_token_id: int  # 2 = "</s>" (the tokenizer's; generation stops at "\n" = 50118 instead)
    pad_token_id: int  # 1 = "<pad>"
    image_token_id: int | None  # 50265 = "<image>", None if the files have no such token

    @property
    def vocab_size(self) -> int:
        """All ids, added tokens included: 50266 for blip2-opt-2.7b (the model has 50304 rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # `GPT2Tokenizer.__call__(text)["input_ids"]`: BOS first, as the processor gives it.
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a str, not {type(text).__name__}.")
        try:
            return self.backend.encode(text).ids  # [T]: [2, ...]
        except Exception as err:  # e.g. lone surrogates ("\ud800") that are not valid UTF-8
            raise PromptError(f"the prompt could not be tokenized ({err}); it must be valid "
                              "Unicode text (no lone surrogate characters).") from err

    # `GPT2Tokenizer.decode`: the backend's decode; clean_up_tokenization_spaces is false on OPT.
    # Ids past the vocabulary (the model's 38 padding rows, 50266..50303) decode to nothing, as
    # in transformers; negative ids are an error.
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(id_list(ids), skip_special_tokens=skip_special_tokens)

    # `GPT2Tokenizer.batch_decode`: ids [B, T] (array or list of lists) -> B strings.
    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        if not isinstance(ids, (list, tuple, np.ndarray)) or (isinstance(ids, np.ndarray) and ids.ndim != 2):
            raise PromptError(f"batch_decode takes ids of shape [batch, tokens] (a 2-D array or a list of "
                              f"lists); got {getattr(ids, 'shape', type(ids).__name__)}.")
        return [self.decode(row, skip_special_tokens) for row in ids]


# One sequence of ids (list, tuple or 1-D array) -> list of Python ints the backend accepts.
def id_list(ids) -> list[int]:
    try:
        ids = np.asarray(ids)
    except ValueError as err:  # ragged nesting
        raise PromptError(f"token ids must be a flat list of ints ({err}).") from err
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise PromptError(f"decode takes one sequence of integer ids; got shape {ids.shape}, "
                          f"dtype {ids.dtype}. Use batch_decode for [batch, tokens].")
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise PromptError(f"token ids must be non-negative 32-bit ints; got {ids.min()}..{ids.max()}.")
    return [int(i) for i in ids]


# `AutoTokenizer.from_pretrained(folder)` for the OPT files.
def load_tokenizer(folder) -> Tokenizer:
    folder = Path(folder)
    special = special_token_names(folder)  # {"bos_token": "</s>", ...}
    backend = backend_from_files(folder, special)
    backend = with_added_tokens_json(backend, folder)
    set_post_processor(backend, folder, special)
    return Tokenizer(
        backend=backend,
        bos_token_id=token_id(backend, special, "bos_token", folder),
        eos_token_id=token_id(backend, special, "eos_token", folder),
        pad_token_id=token_id(backend, special, "pad_token", folder),
        image_token_id=backend.token_to_id(IMAGE_TOKEN),
    )


# tokenizer.json when present (as transformers prefers it), else the classic GPT-2 pair.
def backend_from_files(folder: Path, special: dict) -> Backend:
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            return Backend.from_file(str(tokenizer_json))
        except Exception as err:
            raise CheckpointError(f"{tokenizer_json} could not be loaded ({err}); re-download it.") from err
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return byte_level_bpe(folder, special)
    raise CheckpointError(f"{folder} has no tokenizer.json and no vocab.json + merges.txt; download "
                          "the tokenizer files with the checkpoint.")


# `GPT2Tokenizer.__init__`: the same pipeline tokenizer.json describes, built from the two
# classic GPT-2 files, then the added tokens listed in tokenizer_config.json.
def byte_level_bpe(folder: Path, special: dict) -> Backend:
    try:
        vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as err:
        raise CheckpointError(f"{folder}/vocab.json or merges.txt could not be read ({err}); "
                              "re-download them.") from err
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    # No leading space is added: "Hello" and " Hello" are different tokens, as OPT was trained.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=special.get("add_prefix_space", False))
    backend.decoder = decoders.ByteLevel()
    for token in config_added_tokens(folder):
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):  # named ones not yet listed
        if special.get(key) and backend.token_to_id(special[key]) is None:
            backend.add_special_tokens([AddedToken(special[key], special=True)])
    return backend


# tokenizer_config.json "added_tokens_decoder": {"1": {"content": "<pad>", ...}, ...}, by id.
def config_added_tokens(folder: Path) -> list[AddedToken]:
    path = folder / "tokenizer_config.json"
    entries = read_json(path).get("added_tokens_decoder", {}) if path.is_file() else {}
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return [AddedToken(entry["content"], **{f: entry[f] for f in flags if f in entry})
            for _, entry in sorted(entries.items(), key=lambda item: int(item[0]))]


# added_tokens.json {"<image>": 50265}: the token BLIP-2 added to OPT's vocabulary. Older
# tokenizer.json files may lack it; it must land on the id the file promises.
def with_added_tokens_json(backend: Backend, folder: Path) -> Backend:
    path = folder / "added_tokens.json"
    if not path.is_file():
        return backend
    for content, expected in sorted(read_json(path).items(), key=lambda item: item[1]):
        if backend.token_to_id(content) is None:
            token = AddedToken(content, normalized=False, special=content == IMAGE_TOKEN)
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if backend.token_to_id(content) != expected:
            raise CheckpointError(f"{path} puts {content!r} at id {expected}, but the tokenizer gives it "
                                  f"id {backend.token_to_id(content)}; the tokenizer files do not match.")
    return backend


# `TokenizersBackend.update_post_processor`: an explicit add_bos_token / add_eos_token in
# tokenizer_config.json (OPT: add_bos_token true) replaces tokenizer.json's template.
def set_post_processor(backend: Backend, folder: Path, special: dict) -> None:
    explicit = "add_bos_token" in special or "add_eos_token" in special
    if not explicit and backend.post_processor is not None:
        return
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = bool(special.get("add_bos_token")) and bos is not None  # no BOS token: nothing to add
    add_eos = bool(special.get("add_eos_token")) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    if any(i is None for _, i in tokens):
        raise CheckpointError(f"{folder}: BOS/EOS token {tokens} is not in the vocabulary; the tokenizer "
                              "files do not match.")
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


# bos/eos/unk/pad names and add_* flags: tokenizer_config.json first, special_tokens_map.json for
# anything it leaves out. Values are either "</s>" or {"content": "</s>", ...}.
def special_token_names(folder: Path) -> dict:
    names = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        path = folder / name
        if path.is_file():
            for key, value in read_json(path).items():
                if key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                    names[key] = value["content"] if isinstance(value, dict) else value
                elif key in ("add_bos_token", "add_eos_token", "add_prefix_space"):
                    names[key] = value
    return names


# The id of a named special token ("</s>" -> 2); a name missing from the vocabulary is an error.
def token_id(backend: Backend, special: dict, key: str, folder: Path) -> int:
    name = special.get(key)
    if name is None or backend.token_to_id(name) is None:
        raise CheckpointError(f"{folder}: no usable {key} (got {name!r}) in tokenizer_config.json or "
                              "special_tokens_map.json; download those files with the checkpoint.")
    return backend.token_to_id(name)


# Blip2Processor.__init__ adds "<image>" to a tokenizer that lacks it (at the next free id).
def with_image_token(tokenizer: Tokenizer) -> Tokenizer:
    if tokenizer.image_token_id is not None:
        return tokenizer
    backend = Backend.from_str(tokenizer.backend.to_str())  # a copy: the original stays as loaded
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    return Tokenizer(backend, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     backend.token_to_id(IMAGE_TOKEN))
