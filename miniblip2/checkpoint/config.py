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
from pathlib import Path

from ..errors import CheckpointError
from ..nn import ACTIVATIONS


# A tower's dataclass from the keys of `values` it knows, defaults for the rest. `where` names
# the section ("vision_config") in every error.
def from_dict(cls, values, where: str):
    if not isinstance(values, dict):
        raise CheckpointError(f"config.json: {where} should be a JSON object, not {type(values).__name__}; "
                              "re-download config.json")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in known}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
    for name in ("image_size", "patch_size"):  # transformers also accepts [h, w] pairs
        size = kwargs.get(name)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise CheckpointError(f"{where}.{name} = {size}: only square sizes are supported")
            kwargs[name] = size[0]
    return cls(**kwargs)


def check_activation(where: str, name) -> None:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{where} = {name!r} is not supported; supported: {tuple(ACTIVATIONS)}")


def check_heads(where: str, width: int, heads: int) -> None:
    if width % heads:
        raise CheckpointError(f"{where}: hidden_size {width} is not a multiple of num_attention_heads {heads}")


# A JSON file that must hold an object (config.json and the other small hub files); any
# failure names the file.
def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} could not be read as JSON ({err}); re-download it.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not {type(data).__name__}; re-download it.")
    return data


def read_config_json(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder needs config.json (see weights/README.md)")
    return read_json(path)
