"""Write a BLIP-2 checkpoint with random weights in the hub layout: no download needed.

    python -m miniblip2.testing.random_checkpoint weights/tiny-random
    python -m miniblip2.testing.random_checkpoint weights/opt-2.7b-random --preset blip2-opt-2.7b --layers 2
    python -m miniblip2.testing.random_checkpoint weights/flan-t5-xl-random --preset blip2-flan-t5-xl --layers 2

`tiny` is a few hundred KB with a small byte-level BPE tokenizer and processor files, so the
whole pipeline (image -> caption) runs; its words are random. `blip2-opt-2.7b` and
`blip2-flan-t5-xl` have the real config and shapes (cut to `--layers` per tower if asked: T5's
encoder and decoder both, kept equal) for measuring memory and speed; they have no tokenizer,
so they are driven with token ids. Shards are written one at a time (at most
SHARD_BYTES each) so that memory stays bounded at the real size.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

from ..blip2 import config_from_dict, expected_shapes, tied_weights
from ..checkpoint.safetensors import save_safetensors
from .tiny_tokenizer import build_tiny_processor_files, build_tiny_tokenizer

SHARD_BYTES = 2 << 30

# The real Salesforce/blip2-opt-2.7b config.json: a diff against transformers' defaults.
BLIP2_OPT_2_7B = {
    "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 32,
    "image_token_index": 50265, "image_text_hidden_size": 256, "torch_dtype": "float32",
    "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
    "vision_config": {"dropout": 0.0, "model_type": "blip_2_vision_model", "num_channels": 3, "projection_dim": 512},
    "text_config": {"_name_or_path": "facebook/opt-2.7b", "model_type": "opt", "architectures": ["OPTForCausalLM"],
                    "eos_token_id": 50118, "ffn_dim": 10240, "hidden_size": 2560, "num_attention_heads": 32,
                    "num_hidden_layers": 32, "prefix": "</s>", "vocab_size": 50304, "word_embed_proj_dim": 2560},
}
# Salesforce/blip2-flan-t5-xl's config.json as a diff against transformers' defaults. The saved
# file (shared/reference/blip2-flan-t5-xl/config.json) is the old 4.27 full dict; these are its
# values that differ from 5.23's defaults, plus the current revision's image_token_index. The
# vision layer_norm_eps 1e-5 is what that file states (the default is 1e-6).
BLIP2_FLAN_T5_XL = {
    "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 32,
    "image_token_index": 32100, "image_text_hidden_size": 256, "use_decoder_only_language_model": False,
    "torch_dtype": "float32",
    "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
    "vision_config": {"dropout": 0.0, "model_type": "blip_2_vision_model", "num_channels": 3, "projection_dim": 512,
                      "hidden_size": 1408, "num_hidden_layers": 39, "layer_norm_eps": 1e-5},
    "text_config": {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 2048,
                    "d_ff": 5120, "d_kv": 64, "num_heads": 32, "num_layers": 24, "num_decoder_layers": 24,
                    "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu", "is_gated_act": True,
                    "vocab_size": 32128, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 1,
                    "pad_token_id": 0, "decoder_start_token_id": 0, "layer_norm_epsilon": 1e-6,
                    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128},
}
TINY_VOCAB = 320
TINY = {
    "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 8,
    "image_token_index": TINY_VOCAB - 1,
    "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8, "model_type": "blip_2_vision_model"},
    "qformer_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "model_type": "blip_2_qformer"},
    "text_config": {"model_type": "opt", "vocab_size": TINY_VOCAB, "hidden_size": 48, "ffn_dim": 96,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
                    "eos_token_id": 10, "word_embed_proj_dim": 48},
}
PRESETS = {"tiny": TINY, "blip2-opt-2.7b": BLIP2_OPT_2_7B, "blip2-flan-t5-xl": BLIP2_FLAN_T5_XL}
# The config keys that count each tower's layers; the text tower's by its model_type (T5 has two
# stacks: transformers' generate wants them equal, so --layers cuts both to N).
LAYER_KEYS = {"vision_config": ("num_hidden_layers",), "qformer_config": ("num_hidden_layers",),
              "text_config": {"opt": ("num_hidden_layers",), "t5": ("num_layers", "num_decoder_layers")}}


def layer_keys(values):
    """[(tower, key)] of every layer count in a config dict."""
    model_type = values["text_config"].get("model_type", "opt")
    return [(tower, key) for tower, keys in LAYER_KEYS.items()
            for key in (keys[model_type] if isinstance(keys, dict) else keys)]


def preset_config(name, layers=None):
    values = copy.deepcopy(PRESETS[name])
    if layers is not None:
        for tower, key in layer_keys(values):
            values[tower][key] = layers
    return values


def random_tensor(name, shape, rng, dtype):
    """N(0, 0.02) like transformers' init; layer norm scales around 1 so activations stay sane."""
    values = rng.standard_normal(shape, dtype=np.float32) * 0.02
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "LayerNorm.weight")):
        values += 1
    return values.astype(dtype)


def write_random_weights(folder, config, seed=0, dtype=np.float32):
    """Random safetensors shards with the checkpoint's names and shapes, plus the index. The tied
    names (the copies of a table the hub files leave out) are left out too, except an untied
    config's lm_head (Flan-T5: tie_word_embeddings false), which its files hold."""
    rng = np.random.default_rng(seed)
    tied = set(tied_weights(config))
    if getattr(config.text, "tie_word_embeddings", True) is False:
        tied.discard("language_model.lm_head.weight")
    shapes = {k: v for k, v in expected_shapes(config).items() if k not in tied}
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        save_safetensors(folder / file, {n: random_tensor(n, shapes[n], rng, dtype) for n in names},
                         metadata={"format": "pt"})
        weight_map |= {n: file for n in names}
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(dtype).itemsize},
                 "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_checkpoint(folder, preset="tiny", layers=None, seed=0, dtype=np.float32):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = preset_config(preset, layers)
    config = config_from_dict(values)
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    generation = {"bos_token_id": config.text.bos_token_id, "eos_token_id": config.text.eos_token_id,
                  "pad_token_id": config.text.pad_token_id}
    if config.text.is_encoder_decoder:  # as the hub's blip2-flan-t5-* generation_config.json
        generation["decoder_start_token_id"] = config.text.decoder_start_token_id
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if preset == "tiny":
        build_tiny_tokenizer(folder, config.text.vocab_size)
        build_tiny_processor_files(folder, config.vision.image_size, config.num_query_tokens)
    write_random_weights(folder, config, seed, dtype)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m miniblip2.testing.random_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, help="layers per tower (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = parser.parse_args(argv)
    folder = write_random_checkpoint(args.folder, args.preset, args.layers, args.seed, np.dtype(args.dtype))
    print(f"wrote a random {args.preset} checkpoint to {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
