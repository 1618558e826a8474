"""Tokenizer: prompt text <-> token ids, for both BLIP-2 language models.

The pieces themselves run in Hugging Face's `tokenizers` library, as they do in transformers;
this file only assembles the same pipeline from the checkpoint's files. Two families:

OPT (blip2-opt-2.7b), a byte-level BPE, mirrors transformers' `GPT2Tokenizer`
(models/gpt2/tokenization_gpt2.py, on the `TokenizersBackend` of tokenization_utils_tokenizers.py):

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

Flan-T5 (blip2-flan-t5-xl), a SentencePiece Unigram, mirrors transformers' `T5Tokenizer`
(models/t5/tokenization_t5.py), which keeps tokenizer.json's pieces and scores but not its pipeline:

    text -> added tokens split out ("</s>", "<pad>", "<extra_id_0>", "<image>", ...)
         -> Precompiled normalizer (SentencePiece's NFKC table, from tokenizer.json)
         -> WhitespaceSplit, then Metaspace: each word gets "▁" in front; no whitespace is left
         -> Unigram: the most probable split into the 32,100 pieces -> ids
         -> post-processor: "$A </s>", i.e. no BOS, EOS id 1 appended
    ids  -> Metaspace decoder ("▁" -> " ", the first one dropped) -> text

Quirks of the T5 files: PAD `<pad>` = 0 (also the decoder's start token), EOS `</s>` = 1, UNK
`<unk>` = 2, the 100 sentinels `<extra_id_99>` .. `<extra_id_0>` are ids 32000 .. 32099 (in that
reverse order), and `<image>` = 32100 comes only from added_tokens.json. spiece.model is not
needed. The model has 32,128 rows; the last 27 have no token.

BERT (blip2-itm-vit-g, the Q-Former's text), a WordPiece, mirrors transformers' `BertTokenizer`
(models/bert/tokenization_bert.py), built from vocab.txt (these folders have no tokenizer.json):

    text -> added tokens split out ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "[DEC]", as typed)
         -> BertNormalizer: control characters dropped, CJK characters spaced apart, lower case,
            accents stripped (because lower case is on and strip_accents is unset)
         -> BertPreTokenizer: split on whitespace and around every punctuation character
         -> WordPiece: greedy longest match from the left, later pieces "##"-prefixed; a word
            with no match (or over 100 characters) becomes [UNK] -> ids
         -> post-processor: "[CLS] $A [SEP]", i.e. 101 first and 102 last
    ids  -> WordPiece decoder ("##" pieces joined), then clean_up_tokenization (its config says so)

Quirks of the BLIP-2 ITM files (CHECKPOINTS.md 7.4): 30,522 BERT entries plus `[DEC]` = 30522, the
BOS token of BLIP's decoder, from added_tokens.json, so the Q-Former's 30,523 rows are all used;
[PAD] = 0, [UNK] = 100, [CLS] = 101, [SEP] = 102 (BERT has no EOS: [SEP] stands in), [MASK] = 103.
The BLIP files (blip-image-captioning-*, blip-vqa-*; CHECKPOINTS.md 4.1, 7.2) are the same
BertTokenizer with a tokenizer.json: its 30,522 entries and no [DEC]. BLIP's `[DEC]` = 30522 and
`[ENC]` = 30523 are rows of the model only; decoding drops them, as it drops any id past the
vocabulary.

Legend: B prompts in a batch, T tokens.
"""

import base64
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as Backend

from ..errors import CheckpointError, PromptError
from .config import check_field, read_json, shown

IMAGE_TOKEN = "<image>"


# What `tokenizers` raises on a malformed file or text: its exceptions, and for some fields a Rust
# panic, which pyo3 raises as PanicException, a BaseException that `except Exception` misses (its
# class cannot be imported, so it is told by name). Ctrl-C and exit still pass through.
def library_error(err: BaseException) -> bool:
    return isinstance(err, Exception) or type(err).__name__ == "PanicException"


@dataclass(frozen=True)
class Tokenizer:
    backend: Backend  # the `tokenizers` pipeline: model, normalizer, pre-tokenizer, decoder, post-processor
    bos_token_id: int | None  # OPT: 2 = "</s>", first in every text; T5: None, it has no BOS
    eos_token_id: int  # OPT: 2 = "</s>" (generation stops at "\n" = 50118 instead); T5: 1 = "</s>"
    pad_token_id: int  # OPT: 1 = "<pad>"; T5: 0 = "<pad>"
    image_token_id: int | None  # OPT: 50265, T5: 32100 = "<image>"; None if the files have no such token
    clean_up_spaces: bool = False  # tokenizer_config.json clean_up_tokenization_spaces; false for both

    @property
    def vocab_size(self) -> int:
        """All ids, added tokens included: 50266 for blip2-opt-2.7b (the model has 50304 rows),
        32101 for blip2-flan-t5-xl (the model has 32128)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # `tokenizer(text)["input_ids"]`, as the processor gives it: OPT puts BOS first, T5 EOS last.
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a str, not {type(text).__name__}.")
        try:
            return self.backend.encode(text).ids  # [T]: OPT [2, ...], T5 [..., 1]
        except BaseException as err:  # e.g. lone surrogates ("\ud800") that are not valid UTF-8
            if not library_error(err):
                raise
            raise PromptError(f"the prompt could not be tokenized ({err}); it must be valid "
                              "Unicode text (no lone surrogate characters).") from err

    # `TokenizersBackend._decode`: the backend's decode, then the optional clean-up (off for both
    # BLIP-2 tokenizers). Ids past the vocabulary (the model's padding rows, OPT 50266..50303,
    # T5 32101..32127) decode to nothing, as in transformers; negative ids are an error.
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(id_list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    # `batch_decode`: ids [B, T] (array or list of lists) -> B strings.
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


# `PreTrainedTokenizerBase.clean_up_tokenization`: the spaces a WordPiece decoder leaves before
# punctuation and English contractions. Only used when tokenizer_config.json asks for it.
def clean_up_tokenization(text: str) -> str:
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


# `AutoTokenizer.from_pretrained(folder)`: tokenizer_config.json's tokenizer_class picks the family.
def load_tokenizer(folder) -> Tokenizer:
    folder = Path(folder)
    special = special_token_names(folder)  # {"bos_token": "</s>", ...}
    if special.get("tokenizer_class") in ("T5Tokenizer", "T5TokenizerFast"):
        return load_t5_tokenizer(folder, special)
    if special.get("tokenizer_class") in ("BertTokenizer", "BertTokenizerFast"):
        return load_bert_tokenizer(folder, special)
    backend = backend_from_files(folder, special)
    backend = with_added_tokens_json(backend, folder, special)
    set_post_processor(backend, folder, special)
    return Tokenizer(
        backend=backend,
        bos_token_id=token_id(backend, special, "bos_token", folder),
        eos_token_id=token_id(backend, special, "eos_token", folder),
        pad_token_id=token_id(backend, special, "pad_token", folder),
        image_token_id=backend.token_to_id(IMAGE_TOKEN),
        clean_up_spaces=clean_up_spaces(backend, special),
    )


# `T5Tokenizer.__init__`: no BOS, "</s>" (with the EOS token's id) appended to every text.
def load_t5_tokenizer(folder: Path, special: dict) -> Tokenizer:
    backend = with_added_tokens_json(t5_unigram(folder), folder, special)
    eos = token_id(backend, special, "eos_token", folder)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    return Tokenizer(
        backend=backend,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=token_id(backend, special, "pad_token", folder),
        image_token_id=backend.token_to_id(IMAGE_TOKEN),
        clean_up_spaces=clean_up_spaces(backend, special),
    )


# `BertTokenizer.__init__`: a WordPiece over vocab.txt (or tokenizer.json's vocabulary, which
# transformers 5 also rebuilds this pipeline around), the special tokens as added tokens matched
# verbatim, "[CLS] $A [SEP]" around every text.
def load_bert_tokenizer(folder: Path, special: dict) -> Tokenizer:
    special = BERT_SPECIAL_TOKENS | special  # BertTokenizer's defaults for names the files leave out
    backend = Backend(models.WordPiece(bert_vocab(folder), unk_token=special["unk_token"]))  # "##", 100 chars a word
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=special.get("tokenize_chinese_chars", True),
        strip_accents=special.get("strip_accents"), lowercase=special.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    for token in config_added_tokens(folder):
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    for key in BERT_SPECIAL_TOKENS:  # in the vocabulary already: now also matched verbatim, never split
        backend.add_special_tokens([AddedToken(special[key], normalized=False, special=True)])
    backend = with_added_tokens_json(backend, folder, special)  # [DEC] = 30522
    if special.get("bos_token") and backend.token_to_id(special["bos_token"]) is None:
        backend.add_special_tokens([AddedToken(special["bos_token"], normalized=False, special=True)])
    cls, sep = special["cls_token"], special["sep_token"]
    cls_id, sep_id = token_id(backend, special, "cls_token", folder), token_id(backend, special, "sep_token", folder)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)])
    return Tokenizer(
        backend=backend,
        bos_token_id=backend.token_to_id(special["bos_token"]) if special.get("bos_token") else None,
        eos_token_id=sep_id,  # BERT has no EOS; [SEP] ends every text
        pad_token_id=token_id(backend, special, "pad_token", folder),
        image_token_id=backend.token_to_id(IMAGE_TOKEN),
        clean_up_spaces=clean_up_spaces(backend, special),
    )


BERT_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                       "mask_token": "[MASK]"}


# vocab.txt, one token a line, the line number its id; or the vocabulary in tokenizer.json.
def bert_vocab(folder: Path):
    if (folder / "tokenizer.json").is_file():
        model = read_json(folder / "tokenizer.json").get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            return vocab
    if not (folder / "vocab.txt").is_file():
        raise CheckpointError(f"{folder} has no vocab.txt (and no tokenizer.json with a WordPiece vocabulary); "
                              "download the tokenizer files with the checkpoint.")
    try:
        return models.WordPiece.read_file(str(folder / "vocab.txt"))
    except BaseException as err:
        if not library_error(err):
            raise
        raise CheckpointError(f"{folder}/vocab.txt could not be read ({err}); re-download it.") from err


# tokenizer.json's Unigram pieces and added tokens in the pipeline `T5Tokenizer.__init__` builds
# around them (transformers does not take the file's own): the file's Precompiled normalizer
# alone (its Replace(" {2,}", " ") is dropped), then WhitespaceSplit + Metaspace where the file
# has Metaspace only. The difference shows at the edges: the file's pipeline turns a trailing
# space or "\n" into an extra "▁" (id 3) and "x <extra_id_0>" into "x", "▁", "<extra_id_0>";
# transformers' drops every whitespace character before the Unigram sees the text.
def t5_unigram(folder: Path) -> Backend:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; the T5 tokenizer is read from it (spiece.model "
                              "alone is not supported), download it with the checkpoint.")
    charsmap = precompiled_charsmap(read_json(path).get("normalizer"))  # first: bad base64 makes tokenizers panic
    try:
        backend = Backend.from_file(str(path))
    except BaseException as err:
        if not library_error(err):
            raise
        raise CheckpointError(f"{path} could not be loaded ({err}); re-download it.") from err
    if not isinstance(backend.model, models.Unigram):
        raise CheckpointError(f"{path} holds a {type(backend.model).__name__} model, but tokenizer_config.json "
                              "says T5Tokenizer, which is a Unigram; the tokenizer files do not match.")
    try:
        backend.normalizer = normalizers.Precompiled(charsmap) if charsmap else None
    except BaseException as err:
        if not library_error(err):
            raise
        raise CheckpointError(f"{path}: normalizer.precompiled_charsmap could not be read ({err}); "
                              "re-download it.") from err
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),  # "a  b\n" -> "a", "b": runs of whitespace vanish
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])  # "a" -> "▁a"
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return backend


# The SentencePiece charsmap (bytes) in tokenizer.json's normalizer, which is either the
# Precompiled entry itself or a Sequence holding it; None if there is none.
def precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    entries = normalizer.get("normalizers", [normalizer]) if isinstance(normalizer, dict) else []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("type") == "Precompiled" and entry.get("precompiled_charsmap"):
            try:
                return base64.b64decode(entry["precompiled_charsmap"], validate=True)
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"tokenizer.json: normalizer.precompiled_charsmap is not base64 ({err}); "
                                      "re-download tokenizer.json") from err
    return None


# transformers applies clean_up_tokenization_spaces (default false) to any model but a BPE, where
# it would eat real spaces before punctuation.
def clean_up_spaces(backend: Backend, special: dict) -> bool:
    return bool(special.get("clean_up_tokenization_spaces")) and not isinstance(backend.model, models.BPE)


# tokenizer.json when present (as transformers prefers it), else the classic GPT-2 pair.
def backend_from_files(folder: Path, special: dict) -> Backend:
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            return Backend.from_file(str(tokenizer_json))
        except BaseException as err:
            if not library_error(err):
                raise
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
    except BaseException as err:
        if not library_error(err):
            raise
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
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: added_tokens_decoder = {shown(entries)}: expected an object "
                              '{"id": {"content": ..., ...}}; re-download tokenizer_config.json')
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    tokens = []
    for key, entry in entries.items():
        where = f"{path}: added_tokens_decoder[{key!r}]"
        if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise CheckpointError(f"{where} = {shown(entry)}: each entry needs a numeric id and a \"content\" string; "
                                  "re-download tokenizer_config.json")
        settings = {f: check_field(f"{where}.{f}", f, entry[f], bool, "tokenizer_config.json")
                    for f in flags if f in entry}
        tokens.append((int(key), AddedToken(entry["content"], **settings)))
    return [token for _, token in sorted(tokens, key=lambda item: item[0])]


# added_tokens.json {"<image>": 50265}: the token BLIP-2 added to the language model's vocabulary;
# it must land on the id the file promises. The T5 tokenizer.json lacks it (32100). Its flags:
# - tokenizer_config.json without "added_tokens_decoder" (T5): transformers' legacy reading of
#   this file, special only if it is a named special token, and then not normalized; so <image>
#   is a plain, normalized token (decode keeps it) until Blip2Processor makes it special.
# - with "added_tokens_decoder" (OPT): transformers ignores this file; an older tokenizer.json
#   without <image> still gets it here, special, as Blip2Processor would add it.
def with_added_tokens_json(backend: Backend, folder: Path, special: dict) -> Backend:
    path = folder / "added_tokens.json"
    if not path.is_file():
        return backend
    config = folder / "tokenizer_config.json"
    legacy = "added_tokens_decoder" not in (read_json(config) if config.is_file() else {})
    named = {special.get(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    named |= set(special.get("additional_special_tokens", []))
    added = read_json(path)
    for content, expected in added.items():
        if not (isinstance(expected, int) and not isinstance(expected, bool) and expected >= 0):
            raise CheckpointError(f"{path}: {content!r} = {shown(expected)}: expected a token id (an integer >= 0); "
                                  "re-download added_tokens.json")
    for content, expected in sorted(added.items(), key=lambda item: item[1]):
        if backend.token_to_id(content) is None:
            is_special = content in named if legacy else content == IMAGE_TOKEN
            token = AddedToken(content, normalized=legacy and not is_special, special=is_special)
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


# bos/eos/unk/pad names, the additional special tokens (T5's sentinels), add_* flags and the
# tokenizer class: tokenizer_config.json first, special_tokens_map.json for anything it leaves
# out. Token values are either "</s>" or {"content": "</s>", ...}.
# Every value is checked for its type, naming the file and key: a token given as a number or a
# list, a flag given as a string, would otherwise fail deep in `tokenizers` or pass as truthy.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
SETTING_TYPES = {"add_bos_token": bool | None, "add_eos_token": bool | None, "add_prefix_space": bool | None,
                 "clean_up_tokenization_spaces": bool | None, "tokenizer_class": str | None,
                 "do_lower_case": bool | None, "strip_accents": bool | None, "tokenize_chinese_chars": bool | None}


def special_token_names(folder: Path) -> dict:
    names = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        path = folder / name
        if path.is_file():
            for key, value in read_json(path).items():
                if key in SPECIAL_TOKEN_KEYS:
                    names[key] = token_content(value, f"{path}: {key}")
                elif key == "additional_special_tokens":
                    if not isinstance(value, list):
                        raise CheckpointError(f"{path}: additional_special_tokens = {shown(value)}: expected a list of "
                                              f"tokens; re-download {name}")
                    names[key] = [token_content(v, f"{path}: additional_special_tokens[{i}]")
                                  for i, v in enumerate(value)]
                elif key in SETTING_TYPES:
                    names[key] = check_field(f"{path}: {key}", key, value, SETTING_TYPES[key], name)
    return {key: value for key, value in names.items() if value is not None}


# A special token as saved: "</s>", {"content": "</s>", ...}, or null for none.
def token_content(value, where: str):
    content = value.get("content", value) if isinstance(value, dict) else value
    if content is None or isinstance(content, str):
        return content
    raise CheckpointError(f"{where} = {shown(value)}: a special token must be a string or "
                          '{"content": string, ...}; re-download the tokenizer files')


# The id of a named special token ("</s>" -> 2); a name missing from the vocabulary is an error.
def token_id(backend: Backend, special: dict, key: str, folder: Path) -> int:
    name = special.get(key)
    if name is None or backend.token_to_id(name) is None:
        raise CheckpointError(f"{folder}: no usable {key} (got {name!r}) in tokenizer_config.json or "
                              "special_tokens_map.json; download those files with the checkpoint.")
    return backend.token_to_id(name)


# Blip2Processor.__init__ adds "<image>" as a special, unnormalized token: at the next free id
# when it is missing, and over the plain one T5's added_tokens.json gives (same id, so decoding
# with skip_special_tokens now drops it).
def with_image_token(tokenizer: Tokenizer) -> Tokenizer:
    current = tokenizer.backend.get_added_tokens_decoder().get(tokenizer.image_token_id)
    if current is not None and current.special and not current.normalized:  # OPT: already so
        return tokenizer
    backend = Backend.from_str(tokenizer.backend.to_str())  # a copy: the original stays as loaded
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    return replace(tokenizer, backend=backend, image_token_id=backend.token_to_id(IMAGE_TOKEN))
