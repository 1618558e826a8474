"""BLIP-2 configuration: one frozen dataclass per tower, read from a hub `config.json`.

Hub configs are diffs: they store only the values that differ from the defaults of
transformers' config classes, so every default below is the transformers default
(`Blip2VisionConfig`, `Blip2QFormerConfig`, `OPTConfig`, `Blip2Config` in transformers 5.23).
Keys this code does not use (dropout, initializer ranges, ...) are ignored.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError

SUPPORTED_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu")


# Blip2VisionConfig: the EVA ViT-g image encoder.
@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6  # old full configs say 1e-5 explicitly; an explicit value wins
    qkv_bias: bool = True


# Blip2QFormerConfig: the BERT-like querying transformer.
@dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # always the vision width: Blip2Config forces it
    use_qformer_text_input: bool = False


# OPTConfig: the language model.
@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    activation_function: str = "relu"
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5  # OPT uses nn.LayerNorm's default; no config key sets it
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 2


# Blip2Config: the three towers and the glue between them.
@dataclass(frozen=True)
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    num_query_tokens: int = 32
    image_token_index: int | None = None


def _from_dict(cls, values: dict, where: str):
    """Build dataclass `cls` from the keys of `values` it knows, defaults for the rest."""
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


def _check_supported(config: Blip2Config) -> None:
    """Refuse, with a clear message, what this code cannot run rather than run it wrongly."""
    for where, act in [("vision_config.hidden_act", config.vision.hidden_act),
                       ("qformer_config.hidden_act", config.qformer.hidden_act),
                       ("text_config.activation_function", config.text.activation_function)]:
        if act not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(f"{where} = {act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}")
    text = config.text
    unsupported = {
        "do_layer_norm_before": (text.do_layer_norm_before, True),
        "enable_bias": (text.enable_bias, True),
        "layer_norm_elementwise_affine": (text.layer_norm_elementwise_affine, True),
        "word_embed_proj_dim": (text.word_embed_proj_dim, text.hidden_size),
    }
    for key, (found, wanted) in unsupported.items():
        if found != wanted:
            raise CheckpointError(
                f"text_config.{key} = {found!r}: miniblip2 runs the OPT layout of blip2-opt-2.7b/6.7b "
                f"({key} = {wanted!r}); this checkpoint's language model is not supported yet")
    for tower in (config.vision, config.qformer, config.text):
        if tower.hidden_size % tower.num_attention_heads:
            raise CheckpointError(
                f"{type(tower).__name__}: hidden_size {tower.hidden_size} is not a multiple of "
                f"num_attention_heads {tower.num_attention_heads}")
    if config.image_token_index is None:
        raise CheckpointError(
            "config.json has no image_token_index: this is a pre-2024 BLIP-2 config whose processor does "
            "not insert <image> tokens. Download the current revision of the checkpoint.")


# Blip2Config.from_pretrained: the three sub-configs plus the glue values.
def config_from_dict(values: dict) -> Blip2Config:
    if values.get("model_type") != "blip-2":
        raise CheckpointError(
            f"config.json has model_type {values.get('model_type')!r}; miniblip2 loads BLIP-2 "
            "checkpoints (model_type 'blip-2', e.g. Salesforce/blip2-opt-2.7b)")
    text_values = values.get("text_config") or {}
    text_type = text_values.get("model_type", "opt")
    if text_type != "opt":
        raise CheckpointError(
            f"text_config.model_type is {text_type!r}: miniblip2 supports BLIP-2 with an OPT language "
            "model (blip2-opt-2.7b, blip2-opt-6.7b and their -coco variants); "
            "Flan-T5 BLIP-2 checkpoints are not supported yet")
    vision = _from_dict(VisionConfig, values.get("vision_config") or {}, "vision_config")
    qformer = _from_dict(QFormerConfig, values.get("qformer_config") or {}, "qformer_config")
    qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
    text = _from_dict(TextConfig, text_values, "text_config")
    if text.word_embed_proj_dim is None:
        text = dataclasses.replace(text, word_embed_proj_dim=text.hidden_size)
    config = Blip2Config(vision=vision, qformer=qformer, text=text,
                         num_query_tokens=values.get("num_query_tokens", 32),
                         image_token_index=values.get("image_token_index", values.get("image_token_id")))
    _check_supported(config)
    return config


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


def read_config(folder) -> Blip2Config:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder needs config.json (see weights/README.md)")
    return config_from_dict(read_json(path))
