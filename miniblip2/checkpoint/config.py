"""config.json in, the towers' frozen dataclasses out, with one clear error for what is wrong.

Hub configs are diffs: they store only the values that differ from the defaults of
transformers' config classes. So each tower file holds a dataclass whose defaults are
transformers 5.23's for that tower (`vision.VisionConfig`, `qformer.QFormerConfig`,
`opt.OPTConfig`, `t5.T5Config`), and this file only fills one from a JSON section: the keys it
knows, its defaults for the rest. Keys no dataclass uses (dropout, initializer ranges, ...) are
ignored. The families' glue (blip2.py) puts the sections together.
"""

import dataclasses
import json
import math
import numbers
import types
import typing
from pathlib import Path

from ..errors import CheckpointError
from ..nn import ACTIVATIONS


# A tower's dataclass from the keys of `values` it knows, defaults for the rest. `where` names
# the section ("vision_config") and `file` the file in every error. Each value is checked against
# its field's annotation and least value (check_field), then token ids against the vocabulary.
def from_dict(cls, values, where: str, file: str = "config.json"):
    if not isinstance(values, dict):
        raise CheckpointError(f"{file}: {where} should be a JSON object, not {type(values).__name__} "
                              f"({shown(values)}); re-download {file}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in fields}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
    for name in ("image_size", "patch_size"):  # transformers also accepts [h, w] pairs
        size = kwargs.get(name)
        if isinstance(size, (list, tuple)):
            if len(size) not in (1, 2) or len(set(map(repr, size))) != 1:
                raise CheckpointError(f"{file}: {where}.{name} = {list(size)}: only square sizes are supported "
                                      "(one number, or [n, n])")
            kwargs[name] = size[0]
    for name, value in kwargs.items():
        kwargs[name] = check_field(f"{file}: {where}.{name}", name, value, fields[name].type, file)
    config = cls(**kwargs)
    check_token_ids(config, where, file)
    return config


# The least value of a number, by field name: ints are counts and sizes (widths, heads, patch
# size, cross-attention frequency, vocabulary, positions), so at least 1, except token ids and
# layer counts, which may be 0; floats (epsilons, scale factors, stds) must be above 0, except
# the ones that may take any finite value.
INT_MAY_BE_ZERO = ("num_hidden_layers", "num_layers", "num_decoder_layers", "resample")
FLOAT_MAY_BE_ANY = ("image_mean",)


def least_int(name: str) -> int:
    return 0 if name.endswith(("_token_id", "_token_index")) or name in INT_MAY_BE_ZERO else 1


# One value against its dataclass annotation (int, float, bool, str, X | None, tuple[int, ...],
# tuple[float, ...], unions of those): returned as the field's type (a JSON 1 for a float field
# becomes 1.0, a list for a tuple field a tuple), or a CheckpointError naming `label` (the file
# and key), the value found and what was expected.
def check_field(label: str, name: str, value, annotation, file: str = "config.json"):
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if is_union else (annotation,)
    if value is None and type(None) in options:
        return None
    failures = []
    for option in (o for o in options if o is not type(None)):
        try:
            return checked_as(name, value, option)
        except TypeError as err:
            failures.append(str(err))
    expected = " or ".join(failures + (["null"] if type(None) in options else []))
    raise CheckpointError(f"{label} = {shown(value)} ({type(value).__name__}): expected {expected}; "
                          f"fix or re-download {file}")


def shown(value, limit: int = 60) -> str:  # repr, cut short: a config value can be any JSON
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def checked_as(name: str, value, kind):  # TypeError(what was expected) when `value` is not one
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError(f"a non-empty list, each {checked_name(item, name)}")
        try:
            return tuple(checked_as(name, v, item) for v in value)
        except TypeError:
            raise TypeError(f"a non-empty list, each {checked_name(item, name)}") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
    if kind is int:
        least = least_int(name)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise TypeError(checked_name(int, name))
        return int(value)
    if kind is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or (
                name not in FLOAT_MAY_BE_ANY and value <= 0):
            raise TypeError(checked_name(float, name))
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    raise TypeError(f"a {getattr(kind, '__name__', kind)}")


def checked_name(kind, name: str) -> str:  # "an integer >= 1", "a number > 0", ...
    if kind is int:
        return f"an integer >= {least_int(name)}"
    if kind is float:
        return "a finite number" if name in FLOAT_MAY_BE_ANY else "a finite number > 0"
    return "true or false" if kind is bool else "a string"


# Every token id a tower's config names (pad, bos, eos, decoder start; eos may be a list) must be a
# row of its vocabulary, or generation would stop on, or pad with, an id the model cannot emit.
def check_token_ids(config, where: str, file: str = "config.json") -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        return
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ids = value if isinstance(value, tuple) else (value,)
        if f.name.endswith("_token_id") and any(i is not None and i >= vocab for i in ids):
            raise CheckpointError(f"{file}: {where}.{f.name} = {value!r} is not below {where}.vocab_size = "
                                  f"{vocab}; the config is inconsistent: re-download {file}")


def check_activation(where: str, name) -> None:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise CheckpointError(f"config.json: {where} = {shown(name)} is not supported; supported: {tuple(ACTIVATIONS)}")


def check_heads(where: str, width: int, heads: int) -> None:
    if width % heads:
        raise CheckpointError(f"config.json: {where}: hidden_size {width} is not a multiple of num_attention_heads "
                              f"{heads}; fix or re-download config.json")


# A JSON file that must hold an object (config.json and the other small hub files); any
# failure names the file.
def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as err:  # [[[[...]]]] nested thousands deep
        raise CheckpointError(f"{path} is nested too deeply to be a config file; re-download it.") from err
    except (OSError, ValueError) as err:  # UnicodeDecodeError, JSONDecodeError, a 5,000-digit number
        raise CheckpointError(f"{path} could not be read as JSON ({type(err).__name__}: {str(err)[:200]}); "
                              "re-download it.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not {type(data).__name__}; re-download it.")
    return data


def read_config_json(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder needs config.json (see weights/README.md)")
    return read_json(path)
