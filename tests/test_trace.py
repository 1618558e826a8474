"""The trace facility (miniblip2/trace.py): names, shapes, values, attention probabilities.

Traced values are the very arrays the stages compute, so they must equal the untraced stages bit
for bit. Attention probabilities are compared with transformers' `output_attentions=True` with an
absolute tolerance of 1e-5: probabilities lie in [0, 1] and the tiny models are a few layers
deep, so float32 rounding gives about 1e-7 (measured up to 9e-7); a wrong head split, scale or
mask gives 1e-2 or more.
"""

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from test_parity import image_batch, prompts, reference
from tiny import EOS_TOKEN

import miniblip2
from miniblip2.blip2 import tied_weights
from miniblip2.checkpoint.safetensors import load_checkpoint
from miniblip2.runtime.device import to_numpy
from miniblip2.runtime.trace import PROBS, recording, trace_forward

PROBS_TOL = 1e-5
LARGEST_PROBS_ERRORS = {}  # tower -> largest absolute error seen, for the report


def expected_names(config):
    vision = ["vision_model.embeddings.patch_embedding", "vision_model.embeddings", "vision_model.post_layernorm"]
    for i in range(config.vision.num_hidden_layers):
        vision += [f"vision_model.encoder.layers.{i}", f"vision_model.encoder.layers.{i}.self_attn{PROBS}"]
    qformer = ["qformer.layernorm", "language_projection"]
    for i in range(config.qformer.num_hidden_layers):
        blocks = ["attention"] + (["crossattention"] if i % config.qformer.cross_attention_frequency == 0 else [])
        qformer += [f"qformer.encoder.layer.{i}"]
        for block in blocks:
            qformer += [f"qformer.encoder.layer.{i}.{block}", f"qformer.encoder.layer.{i}.{block}.attention{PROBS}"]
    decoder = "language_model.model.decoder"
    text = [f"{decoder}.embed_tokens", f"{decoder}.embed_positions", f"{decoder}.final_layer_norm",
            "language_model.lm_head"]
    for i in range(config.text.num_hidden_layers):
        text += [f"{decoder}.layers.{i}", f"{decoder}.layers.{i}.self_attn{PROBS}"]
    return set(vision + qformer + text)


@pytest.fixture(scope="module", params=list(CONFIGS))
def traced(request, checkpoint):
    folder = checkpoint(request.param)
    model = miniblip2.load(folder, progress=False)
    pixels = image_batch(model.config, 2, seed=1)
    ids, mask = prompts(model.config, [3, 7], seed=2)  # left padding in row 0
    return folder, model, pixels, ids, mask, trace_forward(model, pixels, ids, mask)


def test_names_are_the_checkpoint_paths(traced):
    folder, model, *_, t = traced
    assert set(t) == expected_names(model.config)
    keys = [*load_checkpoint(folder), *tied_weights(model.config)]  # lm_head.weight: tied, so save_pretrained leaves it out
    for name in t:  # minus the documented suffix, each name is a module whose weights the file holds
        module = name.removesuffix(PROBS)
        assert any(key.startswith(module + ".") for key in keys), name


def test_shapes(traced):
    _, model, pixels, ids, _, t = traced
    c = model.config
    B, T = ids.shape
    tokens = (c.vision.image_size // c.vision.patch_size) ** 2 + 1  # CLS + patches
    Q = c.num_query_tokens
    assert t["vision_model.embeddings.patch_embedding"].shape == (B, tokens - 1, c.vision.hidden_size)
    assert t["vision_model.encoder.layers.0"].shape == (B, tokens, c.vision.hidden_size)
    H = c.vision.num_attention_heads
    assert t[f"vision_model.encoder.layers.0.self_attn{PROBS}"].shape == (B, H, tokens, tokens)
    assert t["qformer.encoder.layer.0"].shape == (B, Q, c.qformer.hidden_size)
    assert t[f"qformer.encoder.layer.0.attention.attention{PROBS}"].shape == (B, c.qformer.num_attention_heads, Q, Q)
    assert t[f"qformer.encoder.layer.0.crossattention.attention{PROBS}"].shape == (
        B, c.qformer.num_attention_heads, Q, tokens)
    assert t["language_projection"].shape == (B, Q, c.text.hidden_size)
    assert t["language_model.model.decoder.layers.0"].shape == (B, T, c.text.hidden_size)
    assert t[f"language_model.model.decoder.layers.0.self_attn{PROBS}"].shape == (B, c.text.num_attention_heads, T, T)
    assert t["language_model.lm_head"].shape == (B, T, c.text.vocab_size)


def test_values_are_the_untraced_stages_bit_for_bit(traced):
    _, model, pixels, ids, mask, t = traced
    image_embeds = model.vision(pixels)  # the stages' own arrays, on the model's device
    query_output = model.qformer(image_embeds)
    last_q = f"qformer.encoder.layer.{model.config.qformer.num_hidden_layers - 1}"
    np.testing.assert_array_equal(t["vision_model.post_layernorm"], to_numpy(image_embeds))
    np.testing.assert_array_equal(t[last_q], to_numpy(query_output))
    np.testing.assert_array_equal(t["language_projection"], to_numpy(model.project(query_output)))
    np.testing.assert_array_equal(t["language_model.lm_head"], model.forward(pixels, ids, mask))


def test_attention_rows_sum_to_one(traced):
    *_, t = traced
    for name, probs in t.items():
        if name.endswith(PROBS):
            assert probs.min() >= 0, name
            np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5, err_msg=name)  # float32 sums of <= 257 terms


def test_attention_probabilities_match_transformers(traced):
    folder, model, pixels, ids, mask, t = traced
    theirs = reference(folder)
    with torch.no_grad():  # each tower on its own: the whole model's forward passes output_attentions to OPT only
        vision = theirs.vision_model(torch.from_numpy(pixels), output_attentions=True)
        qformer = theirs.qformer(query_embeds=theirs.query_tokens.expand(len(pixels), -1, -1),
                                 encoder_hidden_states=vision.last_hidden_state, output_attentions=True)
        text = theirs(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                      attention_mask=torch.from_numpy(mask), output_attentions=True).language_model_outputs
    ours = lambda tower, kind="": [v for k, v in t.items() if k.startswith(tower) and k.endswith(kind + PROBS)]
    # transformers' qformer `attentions` holds self- and cross-attention in call order (its
    # recorder matches ".attention" in both names); `cross_attentions` holds the cross ones.
    pairs = {"vision": (ours("vision_model"), vision.attentions),
             "qformer": (ours("qformer"), qformer.attentions),
             "qformer cross": (ours("qformer", "crossattention.attention"), qformer.cross_attentions),
             "opt": (ours("language_model"), text.attentions)}
    real = torch.from_numpy(mask == 1)
    for tower, (mine, reference_probs) in pairs.items():
        assert len(mine) == len(reference_probs) > 0, tower
        for a, b in zip(mine, reference_probs):
            if tower == "opt":  # rows of padding positions attend to nothing real: undefined in both
                a, b = a.transpose(0, 2, 1, 3)[mask == 1], b.transpose(1, 2)[real]
            error = float(np.abs(a - b.numpy()).max())
            LARGEST_PROBS_ERRORS[tower] = max(error, LARGEST_PROBS_ERRORS.get(tower, 0.0))
            assert error < PROBS_TOL, (tower, error)


def test_tracing_changes_nothing_and_stops_at_the_block(traced):
    _, model, pixels, ids, mask, _ = traced
    before = model.forward(pixels, ids, mask)
    with recording(model) as records:
        during = model.forward(pixels, ids, mask)
    np.testing.assert_array_equal(during, before)
    count = {name: len(arrays) for name, arrays in records.items()}
    model.forward(pixels, ids, mask)  # outside the block: nothing more is kept
    assert {name: len(arrays) for name, arrays in records.items()} == count
    assert set(count.values()) == {1}


def test_recording_generation_keeps_one_array_per_step(checkpoint):
    model = miniblip2.load(checkpoint(), progress=False)
    pixels = image_batch(model.config, 1, seed=3)
    ids, mask = prompts(model.config, [4], seed=4)
    with recording(model) as records:
        out = model.generate(pixels, ids, mask, max_new_tokens=5, min_new_tokens=5)  # no early stop: 5 steps
    steps = [to_numpy(s) for s in records["language_model.lm_head"]]  # recordings stay where computed
    assert len(steps) == 5 and [s.shape for s in steps] == [(1, 1, model.config.text.vocab_size)] * 5
    no_eos = [np.where(np.arange(s.shape[-1]) == EOS_TOKEN, -np.inf, s[0, -1]) for s in steps]  # min_new_tokens
    assert [int(s.argmax()) for s in no_eos] == out[0, ids.shape[1]:].tolist()  # greedy: the argmax
    kv_probs = records[f"language_model.model.decoder.layers.0.self_attn{PROBS}"]
    assert [p.shape[-1] for p in kv_probs] == [ids.shape[1] + i for i in range(5)]  # the cache grows


def test_model_trace_takes_an_image_and_a_prompt(talking_checkpoint):
    model = miniblip2.load(talking_checkpoint, progress=False)
    image = np.full((30, 30, 3), 200, np.uint8)
    t = model.trace(image, prompt="a photo of")
    inputs = model.processor(images=[image], text=["a photo of"])
    np.testing.assert_array_equal(t["language_model.lm_head"], model.forward(
        inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]))
    no_prompt = model.trace(image)  # the image tokens and BOS, where captioning starts
    assert no_prompt["language_model.lm_head"].shape[1] == model.config.num_query_tokens + 1


def test_other_weights_are_not_recorded(checkpoint):
    model, other = miniblip2.load(checkpoint(), progress=False), miniblip2.load(checkpoint(), progress=False)
    pixels = image_batch(model.config, 1, seed=5)
    with recording(model) as records:
        other.vision(pixels)
    assert records == {}
