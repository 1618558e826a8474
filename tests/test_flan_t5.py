"""BLIP-2 with Flan-T5 against transformers: every stage, and every decoding strategy through the
same loops as OPT (generation/loops.py driving t5.T5Decoding).

Tiny random checkpoints built by transformers (tests/tiny.py, every width different, every
parameter re-drawn) are saved in the hub layout and loaded by both libraries. Stages must agree
within 1e-4 relative (the project's parity bar; these few layers measure about 1e-6 in float32)
and generated ids must be identical. The prompts are what Blip2Processor makes for T5: the
`<image>` ids, the text, `</s>`, padded with 0 on the right (and, in one test, on the left).
"""

import numpy as np
import pytest
import torch
from conftest import T5_CONFIGS
from test_generate import CONTROLS, ONE_TOKEN_LEFT
from test_parity import image_batch, rel_error
from tiny import T5_EOS, T5_IMAGE_TOKEN, T5_PAD, T5_VOCAB_SIZE
from transformers import Blip2ForConditionalGeneration

import miniblip2
from miniblip2 import PromptError, t5
from miniblip2.errors import CheckpointError

TOL = 1e-4
NEW_TOKENS = 10
LENGTHS = [1, 6, 3, 9]  # prompt text lengths: every batch is padded
T5_LAYOUTS = [("single", torch.float32), ("sharded", torch.float32), ("sharded", torch.bfloat16)]


def reference(folder):
    return Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def t5_prompts(config, lengths, seed, side="right"):
    """`<image>` x Q, then `n` random text ids and `</s>` per row, padded with 0 on `side`."""
    rng = np.random.default_rng(seed)
    Q, longest = config.num_query_tokens, max(lengths) + 1
    ids = np.full((len(lengths), Q + longest), T5_PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        text = list(rng.integers(3, T5_VOCAB_SIZE - 1, size=n)) + [T5_EOS]  # avoids pad, EOS, unk and <image>
        columns = slice(0, Q + n + 1) if side == "right" else slice(longest - n - 1, None)
        ids[row, columns] = [T5_IMAGE_TOKEN] * Q + text
        mask[row, columns] = 1
    return ids, mask


@pytest.mark.parametrize("layout,dtype", T5_LAYOUTS, ids=[f"{a}-{str(b)[6:]}" for a, b in T5_LAYOUTS])
@pytest.mark.parametrize("name", list(T5_CONFIGS))
def test_every_stage_matches(t5_checkpoint, name, layout, dtype):
    folder = t5_checkpoint(name, layout, dtype)
    ours, theirs = miniblip2.load(folder), reference(folder)
    pixels = image_batch(ours.config, 2, seed=1)
    ids, mask = t5_prompts(ours.config, [3, 7], seed=2)
    decoder_ids = np.array([[T5_PAD, 5, 9, 7], [T5_PAD, 11, 4, 4]])
    with torch.no_grad():
        image_embeds = theirs.vision_model(torch.from_numpy(pixels)).last_hidden_state
        query_output = theirs.qformer(query_embeds=theirs.query_tokens.expand(2, -1, -1),
                                      encoder_hidden_states=image_embeds).last_hidden_state
        projected = theirs.language_projection(query_output)
        embeds = theirs.get_input_embeddings()(torch.from_numpy(ids))
        embeds[torch.from_numpy(ids == T5_IMAGE_TOKEN)] = projected.reshape(-1, projected.shape[-1])
        encoded = theirs.language_model.encoder(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask))
        logits = theirs(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                        attention_mask=torch.from_numpy(mask), decoder_input_ids=torch.from_numpy(decoder_ids)).logits
    our_embeds = ours.embed_inputs(ids, ours.image_features(pixels))
    real = torch.from_numpy(mask == 1)  # padded positions attend to nothing real: undefined in both
    errors = {
        "vision": rel_error(ours.vision(pixels), image_embeds),
        "qformer": rel_error(ours.qformer(image_embeds.numpy()), query_output),
        "projection": rel_error(ours.project(query_output.numpy()), projected),
        "encoder": rel_error(t5.t5_encoder(our_embeds, mask, ours.weights["language_model"], ours.config.text)[mask == 1],
                             encoded.last_hidden_state[real]),
        "logits": rel_error(ours.forward(pixels, ids, mask, decoder_input_ids=decoder_ids), logits),
    }
    for stage, error in errors.items():
        assert error < TOL, f"{stage}: relative error {error:.2e}"
        LARGEST_T5_ERRORS[stage] = max(error, LARGEST_T5_ERRORS.get(stage, 0.0))


LARGEST_T5_ERRORS = {}  # printed by conftest at the end of the session


def test_forward_defaults_to_the_decoder_start_token(t5_checkpoint):
    ours = miniblip2.load(t5_checkpoint())
    pixels = image_batch(ours.config, 1, seed=3)
    ids, mask = t5_prompts(ours.config, [4], seed=4)
    np.testing.assert_array_equal(ours.forward(pixels, ids, mask),
                                  ours.forward(pixels, ids, mask, decoder_input_ids=[[T5_PAD]]))


# --- generation: the same loops as OPT, transformers' ids ------------------------------------------

@pytest.fixture(scope="module", params=list(T5_CONFIGS))
def models(t5_checkpoint, request):
    folder = t5_checkpoint(request.param)
    return miniblip2.load(folder, progress=False), reference(folder)


@pytest.fixture(scope="module")
def batch(models):
    ids, mask = t5_prompts(models[0].config, LENGTHS, seed=5)
    return image_batch(models[0].config, len(LENGTHS), seed=6), ids, mask


@pytest.fixture(scope="module")
def frequent(models, batch):
    """The two ids greedy search emits most: as EOS ids they end rows and beams at different steps
    (the real EOS is rare in a random model and would leave the stopping code untested)."""
    new = models[0].generate(*batch, max_new_tokens=20)[:, 1:]
    values, counts = np.unique(new, return_counts=True)
    return [int(v) for v in values[np.argsort(-counts, kind="stable")[:2]]]


def both(models, batch, rows=len(LENGTHS), **kwargs):
    pixels, ids, mask = (a[:rows] for a in batch)
    with torch.no_grad():
        expected = models[1].generate(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                                      attention_mask=torch.from_numpy(mask), **kwargs).numpy()
    return models[0].generate(pixels, ids, mask, **kwargs), expected


def assert_same(got, expected):
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(models, batch, frequent, rows, use_cache):
    got, expected = both(models, batch, rows, max_new_tokens=NEW_TOKENS, eos_token_id=frequent, use_cache=use_cache)
    assert_same(got, expected)
    assert (got[:, 0] == T5_PAD).all()  # the decoder's start token, as transformers returns it


def test_greedy_with_left_padding_and_default_length(models, batch):
    pixels = batch[0]
    ids, mask = t5_prompts(models[0].config, LENGTHS, seed=5, side="left")
    got, expected = both(models, (pixels, ids, mask))  # no length given: 20 new tokens, EOS from the config
    assert_same(got, expected)
    assert got.shape[1] <= 21


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 2.0])
@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_beam_search_matches_transformers(models, batch, frequent, num_beams, length_penalty, early_stopping):
    got, expected = both(models, batch, max_new_tokens=NEW_TOKENS, num_beams=num_beams, num_return_sequences=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=frequent)
    assert_same(got, expected)


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_without_cache(models, batch, frequent, num_return_sequences):
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=num_return_sequences,
                  eos_token_id=frequent, no_repeat_ngram_size=2)
    got, expected = both(models, batch, use_cache=False, **kwargs)
    assert_same(got, expected)
    np.testing.assert_array_equal(got, models[0].generate(*batch, **kwargs))


T5_CONTROLS = [c for c in CONTROLS if not {"min_length", "max_length", "pad_token_id"} & set(c)] + [
    dict(min_length=7), dict(max_length=8), dict(pad_token_id=7)]  # lengths count the decoder's ids


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("controls", T5_CONTROLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_logits_controls_match_transformers(models, batch, frequent, controls, num_beams):
    lengths = {} if "max_length" in controls else dict(max_new_tokens=NEW_TOKENS)
    assert_same(*both(models, batch, num_beams=num_beams, eos_token_id=frequent, **lengths, **controls))


@pytest.mark.parametrize("kwargs", ONE_TOKEN_LEFT)
def test_sampling_restricted_to_one_token_matches_transformers(models, batch, frequent, kwargs):
    got, expected = both(models, batch, max_new_tokens=NEW_TOKENS, do_sample=True, eos_token_id=frequent, **kwargs)
    assert_same(got, expected)


# The first sampled token of 20,000 samples of one prompt must follow the softmax of the model's
# own first logits (temperature and top-k applied): within 6 standard deviations per token, as
# in test_generate.py's distribution test; seeded, so deterministic.
def test_sampled_first_tokens_follow_the_model_distribution(models, batch):
    ours = models[0]
    pixels, ids, mask = (a[:1] for a in batch)
    draws = 20_000
    got = ours.generate(pixels, ids, mask, do_sample=True, max_new_tokens=1, num_return_sequences=draws,
                        temperature=0.7, top_k=12, seed=0)
    logits = ours.forward(pixels, ids, mask)[0, 0].astype(np.float64) / 0.7
    logits[logits < np.sort(logits)[-12]] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    counts = np.bincount(got[:, 1], minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    expected = draws * probs
    assert np.all(np.abs(counts - expected) <= 6 * np.sqrt(expected * (1 - probs)) + 1e-9)


def test_sampling_is_reproducible(models, batch):
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_p=0.9, num_beams=2, seed=3)
    first = models[0].generate(*batch, **kwargs)
    np.testing.assert_array_equal(models[0].generate(*batch, **kwargs), first)
    assert first.shape[0] == len(LENGTHS)


# --- precision --------------------------------------------------------------------------------------

def test_float16_is_refused_with_the_way_out(t5_checkpoint):
    with pytest.raises(CheckpointError, match="bfloat16"):
        miniblip2.load(t5_checkpoint(), dtype="float16")


# bfloat16 against torch's bfloat16 model. Both round activations to bf16 (8 bits of mantissa),
# at different places (precision.py rounds matrix products and norms, torch every op), and in
# these random models with large activations the logits of either move 2-8% of their largest
# value from the float32 ones. So: ours within 10% of torch's bf16 logits, no further from the
# float32 logits than twice torch's bf16 distance, and really rounded (not float32 in disguise).
@pytest.mark.parametrize("name", list(T5_CONFIGS))
def test_bfloat16_matches_torch_bfloat16(t5_checkpoint, name):
    folder = t5_checkpoint(name)
    ours, exact = miniblip2.load(folder, dtype="bfloat16"), miniblip2.load(folder)
    theirs = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                           attn_implementation="eager").eval()
    pixels = image_batch(ours.config, 2, seed=7)
    ids, mask = t5_prompts(ours.config, [2, 6], seed=8)
    decoder_ids = np.array([[T5_PAD, 3, 8], [T5_PAD, 9, 9]])
    with torch.no_grad():
        expected = theirs(pixel_values=torch.from_numpy(pixels).to(torch.bfloat16), input_ids=torch.from_numpy(ids),
                          attention_mask=torch.from_numpy(mask), decoder_input_ids=torch.from_numpy(decoder_ids)).logits
    got = ours.forward(pixels, ids, mask, decoder_input_ids=decoder_ids)
    float32 = torch.from_numpy(exact.forward(pixels, ids, mask, decoder_input_ids=decoder_ids))
    assert rel_error(got, expected.float()) < 0.1
    assert 1e-3 < rel_error(got, float32) < 2 * rel_error(expected.float().numpy(), float32)


def test_generate_rejects_ids_outside_the_vocabulary(t5_checkpoint):
    ours = miniblip2.load(t5_checkpoint())
    pixels = image_batch(ours.config, 1, seed=9)
    ids, mask = t5_prompts(ours.config, [2], seed=9)
    with pytest.raises(PromptError, match="decoder_input_ids"):
        ours.forward(pixels, ids, mask, decoder_input_ids=[[T5_VOCAB_SIZE]])


# --- images and text in, text out: the processor, caption and stream --------------------------------

@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A tiny BLIP-2 Flan-T5 with a tiny T5 tokenizer and processor files, as transformers saves one."""
    from conftest import save_checkpoint
    from tiny import tiny_model, tiny_t5_config

    from miniblip2.testing.tiny_tokenizer import build_tiny_processor_files, build_tiny_t5_tokenizer
    folder = tmp_path_factory.mktemp("t5-with-tokenizer")
    config = tiny_t5_config()
    save_checkpoint(tiny_model(config, seed=3), folder)
    build_tiny_t5_tokenizer(folder, T5_VOCAB_SIZE)
    build_tiny_processor_files(folder, config.vision_config.image_size, config.num_query_tokens)
    return folder


def picture(seed):
    return np.random.default_rng(seed).integers(0, 256, size=(30, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_is_transformers_decoded_text(talker, num_beams):
    from transformers import Blip2Processor
    ours, theirs = miniblip2.load(talker), reference(talker)
    processor = Blip2Processor.from_pretrained(talker, backend="pil")
    prompts = ["Question: what is this? Answer:", "a photo of the dog", "what?"]  # three lengths: padded
    images = [picture(i) for i in range(3)]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = theirs.generate(**inputs, max_new_tokens=8, num_beams=num_beams, do_sample=False)
    expected = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
    assert ours.caption(images, prompt=prompts, max_new_tokens=8, num_beams=num_beams) == expected
    with torch.no_grad():  # no prompt: the image tokens and BOS, as transformers builds them
        ids = theirs.generate(pixel_values=inputs["pixel_values"][:1], max_new_tokens=8)
    assert ours.caption(images[0], max_new_tokens=8) == processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_stream_pieces_join_to_the_caption(talker):
    ours = miniblip2.load(talker)
    for i, kwargs in enumerate([dict(), dict(prompt="Question: what is this? Answer:", do_sample=True, seed=2)]):
        pieces = list(ours.stream(picture(i), max_new_tokens=12, **kwargs))
        assert "".join(pieces) == ours.caption(picture(i), max_new_tokens=12, **kwargs) and len(pieces) > 1
