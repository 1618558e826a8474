"""Generation settings: the arguments of `generate`, the checkpoint's defaults, transformers' defaults.

Mirrors transformers' `GenerationConfig` (generation/configuration_utils.py) for the settings
miniblip2 supports, resolved with the precedence of `GenerationMixin._prepare_generation_config`:
an argument given to `generate` > the checkpoint's generation_config.json > transformers' global
defaults. Lengths are then turned into a number of new tokens as
`GenerationMixin._prepare_generated_length` does. A bad value raises PromptError, in
transformers' words where it has some.
"""

import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import PromptError

DEFAULT_NEW_TOKENS = 20  # transformers generates 20 new tokens when no length is set anywhere

# GenerationConfig._get_default_generation_params, for the settings below. A max_length of None
# means "not set": transformers then generates DEFAULT_NEW_TOKENS (its default max_length of 20
# is counted after the prompt).
TRANSFORMERS_DEFAULTS = {
    "max_new_tokens": None, "max_length": None, "min_new_tokens": None, "min_length": 0,
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "length_penalty": 1.0, "early_stopping": False,
    "eos_token_id": None, "pad_token_id": None,
}
SETTINGS = tuple(TRANSFORMERS_DEFAULTS)  # the generation arguments `generate` accepts by name


# GenerationConfig after `generate` has prepared it: every value concrete and checked, lengths
# as numbers of new tokens, the EOS ids as a tuple.
@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    min_length: int = 0  # prompt included; min_new_tokens sets it to prompt + min_new_tokens
    min_new_tokens: int = 0
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int = 50  # 0 turns top-k filtering off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never"
    eos_token_ids: tuple = ()
    pad_token_id: int = 1


# The defaults `Blip2ForConditionalGeneration.generate` really uses: transformers' own, with the
# text config's EOS and PAD. transformers 5.23 reads generation_config.json into the outer model
# but generates with `language_model.generation_config`, which is made from the text config, so
# the file's settings are ignored; they are ignored here too, so that the same arguments give the
# same tokens. (Released BLIP-2 files set only bos/eos/pad, equal to the text config's.)
def generation_defaults(config):
    return TRANSFORMERS_DEFAULTS | {"eos_token_id": config.text.eos_token_id, "pad_token_id": config.text.pad_token_id}


# GenerationMixin._prepare_generation_config (precedence) + GenerationConfig.validate and the
# checks of the logits processors' constructors (values) + _prepare_generated_length (lengths).
def resolve_generation_config(defaults, arguments, prompt_length, max_positions, vocab_size):
    unknown = sorted(set(arguments) - set(SETTINGS))
    if unknown:
        raise PromptError(f"unknown generation argument(s) {', '.join(unknown)}; miniblip2 supports "
                          f"{', '.join(SETTINGS)}, seed, generator, streamer, use_cache and interpolate_pos_encoding")
    values = defaults | {k: v for k, v in arguments.items() if v is not None}
    check_values(values, vocab_size)
    eos = values["eos_token_id"]
    eos = (int(eos),) if isinstance(eos, numbers.Integral) else tuple(int(e) for e in eos)
    pad = values["pad_token_id"] if values["pad_token_id"] is not None else eos[0]  # _prepare_special_tokens
    min_new = values["min_new_tokens"]
    max_new_tokens = new_token_budget(values, prompt_length, max_positions)
    check_minimum_fits(values, prompt_length, max_new_tokens)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_length=prompt_length + min_new if min_new is not None else values["min_length"],
        min_new_tokens=min_new or 0, do_sample=values["do_sample"], num_beams=values["num_beams"],
        num_return_sequences=values["num_return_sequences"], temperature=float(values["temperature"]),
        top_k=values["top_k"], top_p=float(values["top_p"]), repetition_penalty=float(values["repetition_penalty"]),
        no_repeat_ngram_size=values["no_repeat_ngram_size"], length_penalty=float(values["length_penalty"]),
        early_stopping=values["early_stopping"], eos_token_ids=eos, pad_token_id=int(pad))


# GenerationMixin._prepare_generated_length: max_new_tokens wins over max_length, which counts
# the prompt (for an encoder-decoder, the decoder's start token); with neither set, 20 new
# tokens, but never past the position table (`max_positions`; None for T5, which has none).
def new_token_budget(values, prompt_length, max_positions):
    if values["max_new_tokens"] is not None:
        return values["max_new_tokens"]
    if values["max_length"] is not None:
        if values["max_length"] <= prompt_length:
            raise PromptError(f"Input length of input_ids is {prompt_length}, but `max_length` is set to "
                              f"{values['max_length']}: nothing is left to generate. Increase `max_length` "
                              "or, better yet, set `max_new_tokens`.")
        return values["max_length"] - prompt_length
    budget = min(prompt_length + DEFAULT_NEW_TOKENS, max_positions or np.inf) - prompt_length
    if budget < 1:
        raise PromptError(f"the prompt is {prompt_length} tokens, all of the model's {max_positions} positions: "
                          "no new token fits. Shorten the prompt")
    return budget


# A minimum the maximum leaves no room for: transformers would suppress EOS to the end and stop at
# the maximum anyway, so the minimum is a mistake; say which two settings disagree.
def check_minimum_fits(values, prompt_length, max_new_tokens):
    min_new, min_length = values["min_new_tokens"], values["min_length"]
    if min_new is not None and min_new > max_new_tokens:
        raise PromptError(f"`min_new_tokens` ({min_new}) is more than the {max_new_tokens} new tokens allowed "
                          "(`max_new_tokens`, or `max_length` minus the prompt): lower `min_new_tokens` or raise "
                          "`max_new_tokens`.")
    if min_new is None and min_length > prompt_length + max_new_tokens:
        raise PromptError(f"`min_length` ({min_length}, prompt included) is more than the prompt ({prompt_length}) "
                          f"plus the {max_new_tokens} new tokens allowed: lower `min_length` or raise "
                          "`max_new_tokens`.")


# What one generation holds at once, refused up front when it cannot fit: every row (an input
# times its beams or samples) keeps `bytes_per_position` (the KV cache, float32) for each of its
# `positions`, and each step's scores [rows, V] pass through a few float64-wide temporaries.
# Without this a num_return_sequences in the millions dies in MemoryError or the OOM killer.
SCORE_TEMPORARIES = 4


def check_memory(gen, batch, positions, bytes_per_position, vocab_size, available, where):
    per_input = max(gen.num_beams, gen.num_return_sequences)
    rows = batch * per_input
    need = rows * (positions * bytes_per_position + SCORE_TEMPORARIES * vocab_size * 8)
    if need > available:
        raise PromptError(f"this generation would need about {need / 2**30:,.1f} GiB ({batch} input(s) x {per_input} "
                          f"(num_beams={gen.num_beams}, num_return_sequences={gen.num_return_sequences}) rows of "
                          f"{positions} positions, max_new_tokens={gen.max_new_tokens}), more than the "
                          f"{available / 2**30:,.1f} GiB available {where}: lower num_return_sequences, num_beams, "
                          "max_new_tokens or the number of images.")


def check_values(values, vocab_size):
    for name, low in [("max_new_tokens", 1), ("max_length", 1), ("min_new_tokens", 0), ("min_length", 0),
                      ("num_beams", 1), ("num_return_sequences", 1), ("top_k", 0), ("no_repeat_ngram_size", 0),
                      ("pad_token_id", 0)]:
        if values[name] is not None and not is_int(values[name], low):
            raise PromptError(f"`{name}` must be an integer >= {low}, but is {values[name]!r}.")
    if not isinstance(values["do_sample"], (bool, np.bool_)):
        raise PromptError(f"`do_sample` must be True or False, but is {values['do_sample']!r}.")
    if values["early_stopping"] not in (True, False, "never") or not isinstance(values["early_stopping"], (bool, str)):
        raise PromptError(f"`early_stopping` must be a boolean or 'never', but is {values['early_stopping']!r}.")
    if not is_real(values["temperature"]) or not 0 < values["temperature"] < np.inf:
        raise PromptError(f"`temperature` (={values['temperature']!r}) has to be a strictly positive, finite float, "
                          "otherwise your next token scores will be invalid. For greedy decoding set "
                          "`do_sample=False`.")
    if not is_real(values["top_p"]) or not 0 < values["top_p"] <= 1:
        raise PromptError(f"`top_p` has to be a float > 0 and <= 1 (1 turns it off), but is {values['top_p']!r}.")
    if not is_real(values["repetition_penalty"]) or not 0 < values["repetition_penalty"] < np.inf:
        raise PromptError(f"`repetition_penalty` has to be a strictly positive, finite float (1.0 means no "
                          f"penalty), but is {values['repetition_penalty']!r}.")
    if not is_real(values["length_penalty"]) or not np.isfinite(values["length_penalty"]):
        raise PromptError(f"`length_penalty` must be a finite number, but is {values['length_penalty']!r}.")
    check_eos(values["eos_token_id"], vocab_size)
    beams, count = values["num_beams"], values["num_return_sequences"]
    if count > 1 and beams == 1 and not values["do_sample"]:
        raise PromptError("Greedy methods (do_sample != True) without beam search do not support "
                          f"`num_return_sequences` different than 1 (got {count}). "
                          f"Set do_sample=True or num_beams>={count}.")
    if beams > 1 and count > beams:
        raise PromptError(f"`num_return_sequences` ({count}) has to be smaller or equal to `num_beams` ({beams}).")


def check_eos(eos, vocab_size):
    ids = [eos] if is_int(eos, 0) else list(eos) if isinstance(eos, (list, tuple)) else None
    if not ids or not all(is_int(i, 0) and i < vocab_size for i in ids):
        raise PromptError(f"`eos_token_id` must be a token id or a non-empty list of token ids in [0, {vocab_size}), "
                          f"but is {eos!r}.")


def is_int(value, low):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= low


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


# `do_sample` draws from a NumPy Generator: `generator=` one of yours, or `seed=` an int for a
# fresh one, or neither for a random seed (like torch's global RNG).
def random_generator(seed=None, generator=None):
    if seed is not None and generator is not None:
        raise PromptError("give either seed= or generator=, not both")
    if generator is not None:
        if not isinstance(generator, np.random.Generator):
            raise PromptError(f"generator must be a numpy.random.Generator (np.random.default_rng(seed)), "
                              f"not {type(generator).__name__}")
        return generator
    if seed is not None and not is_int(seed, 0):
        raise PromptError(f"seed must be a non-negative integer, but is {seed!r}")
    return np.random.default_rng(seed)
