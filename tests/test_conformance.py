"""Conformance to the real blip2-opt-2.7b layout: its config.json and the key names and shapes
of its model.safetensors.index.json, with the towers cut to a few layers.

A random checkpoint is written with exactly those names, the real widths (1408 / 768 / 2560,
vocabulary 50304), the real two-shard split (later decoder layers in shard 2) and the real
diff-dict config, then loaded and run by miniblip2 and by transformers. Skipped where
../shared/reference is absent.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE
from transformers import Blip2ForConditionalGeneration

import miniblip2
from miniblip2.checkpoint.safetensors import save_safetensors

REAL = REFERENCE / "blip2-opt-2.7b"
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example.png"
LAYERS = {"vision_model.encoder.layers": 1, "qformer.encoder.layer": 2, "language_model.model.decoder.layers": 2}
TOL = 1e-4  # the parity bar; float32 rounding at these widths measures about 1e-6

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/reference is absent")


def kept(name, layers):
    """Keep layers 0..N-1 of each tower and every non-layer key."""
    for prefix, n in layers.items():
        match = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
        if match:
            return int(match.group(1)) < n
    return True


def write_cut_checkpoint(real, folder, layers, config_changes, second_shard):
    """Random weights at the real names and shapes of checkpoint folder `real`, with the towers cut
    to `layers` {key prefix: N} (config_changes {section: {key: value}} say so in config.json), the
    names starting with `second_shard` in shard 2 as in the real split, stored in float16. The
    real small files (config, tokenizer, processor) are copied. Returns the kept names."""
    index = json.loads((real / "model.safetensors.index.json").read_text())
    names = [name for name in index["weight_map"] if kept(name, layers)]
    config = json.loads((real / "config.json").read_text())
    for section, changes in config_changes.items():  # section "": the top level
        (config[section] if section else config).update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for small in real.iterdir():
        if small.suffix in (".json", ".txt") and small.name not in ("config.json", "model.safetensors.index.json") \
                and not small.name.startswith(("pytorch_model", "KEYS", "PREDICTED", "HUB-")):
            shutil.copy(small, folder / small.name)

    # The real shapes, from the config (the index lists names only): ask transformers' own model
    # on the meta device, which allocates nothing.
    from transformers import Blip2Config
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  Blip2ForConditionalGeneration(Blip2Config.from_pretrained(folder)).state_dict().items()}
    rng = np.random.default_rng(0)
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name in names:
        values = rng.standard_normal(shapes[name], dtype=np.float32) * 0.02
        if name.endswith(("norm.weight", "LayerNorm.weight", "layernorm.weight")):
            values += 1  # layer norm scales near 1, as trained ones are
        shard = 2 if name.startswith(second_shard) else 1
        shards[f"model-0000{shard}-of-00002.safetensors"][name] = values.astype(np.float16)
    weight_map = {}
    for file, tensors in shards.items():
        save_safetensors(folder / file, tensors)
        weight_map |= {name: file for name in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip2-opt-2.7b-cut")
    last_decoder_layer = f"language_model.model.decoder.layers.{LAYERS['language_model.model.decoder.layers'] - 1}."
    sections = ["vision_config", "qformer_config", "text_config"]
    changes = {section: {"num_hidden_layers": n} for section, n in zip(sections, LAYERS.values())}
    names = write_cut_checkpoint(REAL, folder, LAYERS, changes, last_decoder_layer)
    return folder, names


def test_cut_checkpoint_has_the_real_names(real_layout):
    folder, names = real_layout
    assert "language_model.lm_head.weight" not in names  # tied to embed_tokens, as in the real file
    model = miniblip2.load(folder)
    assert model.weights["language_model"]["model"]["decoder"]["embed_tokens"]["weight"].shape == (50304, 2560)
    assert model.weights["vision_model"]["embeddings"]["position_embedding"].shape == (1, 257, 1408)
    assert "crossattention" in model.weights["qformer"]["encoder"]["layer"][0]
    assert "crossattention" not in model.weights["qformer"]["encoder"]["layer"][1]
    assert model.config.vision.layer_norm_eps == 1e-6 and model.config.text.eos_token_id == 50118


def test_real_layout_runs_and_matches_transformers(real_layout):
    folder, _ = real_layout
    ours = miniblip2.load(folder)
    theirs = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    ids = np.array([[50265] * 32 + [2, 45641, 35, 61, 343, 16, 42, 116, 31652, 35]])  # "Question: which city..."
    with torch.no_grad():
        logits = theirs(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids)).logits
        expected = theirs.generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                   max_new_tokens=5, do_sample=False)
    ours_logits = ours.forward(pixels, ids)
    assert ours_logits.shape == (1, 42, 50304)
    error = np.abs(ours_logits - logits.numpy()).max() / np.abs(logits.numpy()).max()
    assert error < TOL, error
    np.testing.assert_array_equal(ours.generate(pixels, ids, max_new_tokens=5), expected.numpy())


def test_real_processor_files_drive_the_same_caption(real_layout):
    """The real preprocessor, processor and tokenizer files: image file + question in, same text out."""
    from PIL import Image
    from transformers import Blip2Processor
    folder, _ = real_layout
    ours = miniblip2.load(folder)
    theirs = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = Blip2Processor.from_pretrained(folder, backend="pil")  # PIL resizing, as miniblip2 (not torchvision)
    image, question = EXAMPLE, "Question: what is in the picture? Answer:"
    inputs = processor(images=Image.open(image), text=question, return_tensors="pt")
    with torch.no_grad():
        ids = theirs.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert ours.caption(image, prompt=question, max_new_tokens=4) == expected
