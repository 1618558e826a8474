"""The Flan-T5 language model (miniblip2/t5.py) against transformers' T5ForConditionalGeneration,
built tiny and random: widths that all differ (d_model 36, 5 heads of 7, so the attention width
35 is not d_model; FFN 29), 2 encoder and 3 decoder blocks, 8 position buckets with max
distance 20 so that the encoder's 24 tokens and the decoder's 11 reach the logarithmic buckets
and the last one. Three variants: the original T5 FFN (relu, untied lm_head, unscaled); the
gated FFN with "gelu_new" and the tied, d_model^-0.5 scaled head; and blip2-flan-t5-xl's config
(gated, dense_act_fn "gelu" stored explicitly, its own lm_head, unscaled).

Relative error = max|ours - reference| / max|reference|, both in float32. Tolerance 1e-4 (the
project's parity bar, as tests/test_parity.py): a few blocks of float32 rounding give about 1e-6;
a real mistake (a wrong bucket, a missing scale, a transposed weight) gives 1e-2 or more.
bfloat16: see test_bfloat16_matches_torch_in_bfloat16.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from strict_numpy import StrictArray, to_strict
from transformers import Blip2Config, T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

from miniblip2 import nn as mnn
from miniblip2 import t5
from miniblip2.checkpoint.config import read_json
from miniblip2.checkpoint.safetensors import check_weights, nest
from miniblip2.errors import CheckpointError
from miniblip2.runtime.precision import cast_weights

TOL = 1e-4
REFERENCE = "/work/shared/reference/blip2-flan-t5-xl"
BASE = dict(vocab_size=120, d_model=36, d_kv=7, num_heads=5, d_ff=29, num_layers=2, num_decoder_layers=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, pad_token_id=0, eos_token_id=1,
            bos_token_id=1, decoder_start_token_id=0)
VARIANTS = {
    "relu-untied": dict(feed_forward_proj="relu", tie_word_embeddings=False),
    "gated-gelu-tied": dict(feed_forward_proj="gated-gelu"),
    "flan": dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False),
}
LENGTHS = [24, 17, 6]  # real encoder tokens per row: row 1 padded on the right, row 2 on the left
NEW_TOKENS = 10


def rel_error(ours, theirs):
    theirs = theirs.detach().float().double().numpy()
    return np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max()


def reference(variant, seed=0):
    """A random T5ForConditionalGeneration in fp32, eval mode, eager attention, every parameter
    re-drawn (transformers starts norms at one) so that each one matters to the output."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**BASE, **VARIANTS[variant])).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        if not model.config.scale_decoder_outputs:  # a file with its own lm_head, as Flan-T5's
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "layer_norm" in name else 0.2 * torch.randn_like(p))
    return model


def ours(model):  # (weights, config) as miniblip2 reads them: the state dict nested by name
    return nest({k: v.detach().float().numpy() for k, v in model.state_dict().items()}), t5.t5_config(
        model.config.to_dict())


def encoder_inputs(seed=1):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((len(LENGTHS), max(LENGTHS), BASE["d_model"])).astype(np.float32)
    mask = np.zeros(embeds.shape[:2], dtype=np.int64)
    mask[0, :] = 1
    mask[1, :LENGTHS[1]] = 1
    mask[2, -LENGTHS[2]:] = 1
    return embeds, mask


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    model = reference(request.param)
    return model, *ours(model)


def test_relative_position_bucket_is_exact():
    relative = torch.arange(-300, 301)[None, :] - torch.arange(0, 40)[:, None]  # [40, 601]
    for num_buckets, max_distance in [(8, 20), (32, 128), (32, 64), (64, 256)]:
        for bidirectional in (True, False):
            theirs = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
            mine = t5.relative_position_bucket(relative.numpy(), bidirectional, num_buckets, max_distance)
            np.testing.assert_array_equal(mine, theirs.numpy())
            # the distances reach every bucket, the last too; but for the upper (later keys) half
            # of the encoder's, whose "distance 0" bucket only relative position 0 could have
            unused = {num_buckets // 2} if bidirectional else set()
            assert set(np.unique(mine)) == set(range(num_buckets)) - unused


def test_rms_norm_matches_t5_layer_norm():
    torch.manual_seed(0)
    norm = T5LayerNorm(36, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(36))
    x = 3 * torch.randn(2, 5, 36)
    w = {"weight": norm.weight.detach().numpy()}
    assert rel_error(mnn.rms_norm(x.numpy(), w, 1e-6), norm(x)) < 1e-6  # one reduction: float32 rounding
    norm_bf16 = norm.to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    w_bf16 = cast_weights({"weight": w["weight"]}, "bfloat16")
    # both round twice to bf16 from the same float32 numbers: equal up to a rare 1-ulp tie (2^-8)
    assert rel_error(mnn.rms_norm(x_bf16.float().numpy(), w_bf16, 1e-6), norm_bf16(x_bf16)) < 2 ** -7


def test_encoder_matches_torch_on_real_positions(pair):
    model, w, config = pair
    embeds, mask = encoder_inputs()
    with torch.no_grad():
        theirs = model.encoder(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask))
    real = mask == 1  # padded positions are computed too but mean nothing
    assert rel_error(t5.t5_encoder(embeds, mask, w, config)[real], theirs.last_hidden_state[torch.from_numpy(real)]) \
        < TOL


def test_teacher_forced_logits_match_torch(pair):
    model, w, config = pair
    embeds, mask = encoder_inputs()
    ids = np.random.default_rng(2).integers(0, BASE["vocab_size"], size=(len(LENGTHS), 12))
    ids[:, 0] = config.decoder_start_token_id
    with torch.no_grad():
        theirs = model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                       decoder_input_ids=torch.from_numpy(ids)).logits
    assert rel_error(t5.t5_forward(embeds, mask, ids, w, config), theirs) < TOL


def greedy(decoding, steps, eos, pad):
    """GenerationMixin._sample's greedy path: rows that ended get `pad`; stop when all ended."""
    ids, finished = decoding.prompt_ids, np.zeros(decoding.prompt_ids.shape[0], bool)
    logits, state = decoding.start()
    for step in range(steps):
        next_ids = np.where(finished, pad, logits.argmax(axis=1))
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
        finished |= next_ids == eos
        if finished.all() or step == steps - 1:
            return ids
        logits, state = decoding.step(next_ids, state)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_ids_equal_torch_generate(pair, use_cache):
    model, w, config = pair
    embeds, mask = encoder_inputs(seed=3)
    # generate's default cache is sized by num_layers, the encoder's (transformers 5.23), and fails
    # when the decoder has more blocks; a cache that grows per layer works for both
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        theirs = model.generate(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                                do_sample=False, max_new_tokens=NEW_TOKENS, past_key_values=cache)
    decoding = t5.T5Decoding(w, config, embeds, mask, NEW_TOKENS, use_cache=use_cache)
    assert (decoding.prompt_ids == config.decoder_start_token_id).all() and decoding.prompt_mask.shape == (3, 1)
    mine = greedy(decoding, NEW_TOKENS, config.eos_token_id, config.pad_token_id)
    np.testing.assert_array_equal(mine, theirs.numpy())
    assert mine.shape[1] > 4  # the test means something only if the rows ran several steps


# Beam search: reorder after two steps, then step on; the logits must be those of decoding the
# reordered rows from the start (the self-attention cache and the ids followed their rows). The
# rows are one input's beams, as in the loops: the same encoder input, different fed ids (the
# cross-attention keys and values are then the same for every row and are not moved).
@pytest.mark.parametrize("use_cache", [True, False])
def test_reorder_follows_the_rows(pair, use_cache):
    _, w, config = pair
    embeds, mask = (np.repeat(x[:1], 3, axis=0) for x in encoder_inputs(seed=4))  # one input, 3 beams
    rows = np.array([2, 0, 0])
    fed = np.random.default_rng(5).integers(2, BASE["vocab_size"], size=(4, 3))  # ids fed at steps 1..4

    def run(embeds, mask, fed, reorder_at=None):
        decoding = t5.T5Decoding(w, config, embeds, mask, 6, use_cache=use_cache)
        logits, state = decoding.start()
        for step, ids in enumerate(fed):
            if step == reorder_at:
                state = decoding.reorder(state, rows)
            logits, state = decoding.step(ids, state)
        return logits

    reordered = run(embeds, mask, np.concatenate([fed[:2], fed[2:, rows]]), reorder_at=2)
    expected = run(embeds[rows], mask[rows], fed[:, rows])
    np.testing.assert_allclose(reordered, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert np.abs(reordered - run(embeds, mask, fed)).max() > 1e-2  # the reorder changed something


# bfloat16: our weights cast with cast_weights vs torch's model `.to(bfloat16)`, both fed the same
# bf16 inputs. As in tests/test_precision.py, two correct bf16 programs differ by bf16 rounding
# (we round at the products and norms, torch at every op) and the difference travels on. T5
# amplifies it more than OPT: its attention scores are not scaled by 1/sqrt(K), so they are
# large and one bf16 ulp of a score (2^-4 at 10) moves the softmax. Measured over 3 seeds:
#     ours vs torch bf16:          encoder <= 2.2e-2, logits <= 6.4e-2
#     torch bf16 vs torch fp32:    encoder <= 3.7e-2, logits <= 8.0e-2
# so ours is as close to torch's bf16 model as that is to its own fp32 one. TOL_BF16 = 1e-1,
# about 12 bf16 ulps (2^-7); an unwidened bf16 weight, a lost scale or a wrong table gives 1 or more.
TOL_BF16 = 1e-1


def test_bfloat16_matches_torch_in_bfloat16(pair):
    model, _, config = pair
    flat = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w16 = nest(cast_weights(flat, "bfloat16"))
    theirs = copy.deepcopy(model).to(torch.bfloat16)  # keeps lm_head tied or untied as it is
    embeds, mask = encoder_inputs()
    embeds16 = torch.from_numpy(embeds).to(torch.bfloat16)
    ids = np.random.default_rng(2).integers(0, BASE["vocab_size"], size=(len(LENGTHS), 8))
    with torch.no_grad():
        encoded = theirs.encoder(inputs_embeds=embeds16, attention_mask=torch.from_numpy(mask)).last_hidden_state
        logits = theirs(inputs_embeds=embeds16, attention_mask=torch.from_numpy(mask),
                        decoder_input_ids=torch.from_numpy(ids)).logits
    real = mask == 1
    embeds = embeds16.float().numpy()
    errors = {"encoder": rel_error(t5.t5_encoder(embeds, mask, w16, config)[real], encoded[torch.from_numpy(real)]),
              "logits": rel_error(t5.t5_forward(embeds, mask, ids, w16, config), logits)}
    assert max(errors.values()) < TOL_BF16, errors


# The math reaches NumPy only through `xp = namespace(x)` (so it runs on CuPy): on StrictArrays a
# direct np.* call raises (tests/strict_numpy.py), and the numbers must be the same bit for bit.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_runs_through_the_array_namespace(pair, dtype):
    model, _, config = pair
    w = nest(cast_weights({k: v.detach().numpy() for k, v in model.state_dict().items()}, dtype))
    embeds, mask = encoder_inputs()
    ids = np.zeros((3, 2), dtype=np.int64)

    def run(w, embeds, mask, ids):
        decoding = t5.T5Decoding(w, config, embeds, mask, 3)
        _, state = decoding.start()
        state = decoding.reorder(state, ids[:, 0] + 2)
        logits, _ = decoding.step(ids[:, 1], state)
        return t5.t5_forward(embeds, mask, ids, w, config), logits

    checked = run(to_strict(w), embeds.view(StrictArray), mask.view(StrictArray), ids.view(StrictArray))
    assert all(isinstance(a, StrictArray) for a in checked)
    for got, plain in zip(checked, run(w, embeds, mask, ids)):
        np.testing.assert_array_equal(np.asarray(got), plain)


def test_expected_shapes_match_torch_and_ties_fill_the_gaps(pair):
    model, _, config = pair
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == t5.expected_shapes(config)
    # a file as save_pretrained writes it: the tied copies left out
    tied = t5.tied_weights(config)
    saved = {k: v for k, v in state.items() if k not in tied or not np.shares_memory(v, state[tied[k]])}
    assert set(saved) < set(state)
    check_weights(saved, t5.expected_shapes(config), tied=tied)


def test_real_flan_t5_xl_config_and_keys():
    values = read_json(Path(REFERENCE) / "config.json")["text_config"]
    config, theirs = t5.t5_config(values), Blip2Config(text_config=values).text_config
    for key in ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "vocab_size",
                "dense_act_fn", "is_gated_act", "scale_decoder_outputs", "decoder_start_token_id", "bos_token_id",
                "eos_token_id", "pad_token_id", "layer_norm_epsilon"):
        assert getattr(config, key) == getattr(theirs, key), key
    assert (config.dense_act_fn, config.scale_decoder_outputs, config.hidden_size) == ("gelu", False, 2048)
    index = read_json(Path(REFERENCE) / "model.safetensors.index.json")["weight_map"]
    keys = {k.removeprefix("language_model.") for k in index if k.startswith("language_model.")}
    expected = t5.expected_shapes(config)
    assert keys <= set(expected) and set(expected) - keys == {"encoder.embed_tokens.weight",
                                                               "decoder.embed_tokens.weight"}
    assert expected["decoder.block.23.layer.2.DenseReluDense.wo.weight"] == (2048, 5120)


@pytest.mark.parametrize("values,key", [({"feed_forward_proj": "gated-swish"}, "text_config.feed_forward_proj"),
                                        ({"feed_forward_proj": "relu-gelu"}, "text_config.feed_forward_proj"),
                                        ({"feed_forward_proj": "gated-gelu", "dense_act_fn": "mish"},
                                         "text_config.dense_act_fn"),
                                        ({"bos_token_id": None}, "decoder_start_token_id")])
def test_unsupported_configs_are_refused_by_name(values, key):
    with pytest.raises(CheckpointError, match=key):
        t5.t5_config(values)
