"""BLIP's matching models against transformers 5.23: BlipForImageTextRetrieval (ITM and ITC
heads, miniblip2.BlipRetrieval), BlipModel (miniblip2.BlipFeatures), BlipTextModel and
BlipVisionModel, as tiny random checkpoints on disk loaded by both libraries; then the real
blip-itm-base-coco and -large-coco layouts at cut depth, the processor, `match`, `similarity`,
the CLI and bad input.

Relative error = max|ours - reference| / max|reference|, as in test_blip.py. float32: 1e-4, the
project's parity bar (these few layers measure about 1e-6; a missed mask, the wrong row or a
skipped cross-attention gives 1e-2 or more). float16 and bfloat16: test_precision.py's bars of a
few ulps, 5e-3 and 4e-2, since two correct half programs round at different places. ITC scores
are cosines, so their error is measured against 1, their scale, not against the batch's largest
(random tiny models give cosines of 0.2, which would inflate a float16 ulp of an embedding
threefold); BlipModel's logits likewise against exp(logit_scale).

The texts come in right-padded batches of different lengths (BlipProcessor's layout): padding
rows are computed by both libraries (they still attend to the real tokens), so every row is
compared, padding included.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE
from test_blip import add_processor_files
from tiny import (
    BLIP_BOS,
    BLIP_PAD,
    BLIP_SEP,
    BLIP_VOCAB_SIZE,
    tiny_blip_config,
    tiny_blip_matching_config,
    tiny_blip_matching_model,
)
from transformers import (
    BlipForImageTextRetrieval,
    BlipModel,
    BlipProcessor,
    BlipTextModel,
    BlipVisionModel,
)

import miniblip2
from miniblip2 import blip_retrieval, cli, families, retrieval
from miniblip2.errors import CheckpointError, ImageError, MiniBlip2Error, PromptError
from miniblip2.runtime.device import to_numpy

TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 4e-2}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LARGEST_ERRORS = {}  # (output, dtype) -> largest relative error seen, printed at the end (-s)

IMAGE, POSITIONS = 30, 64  # tiny_blip_config: 30 px images in 6 px patches (26 tokens), 64 text positions
TEXT_LENGTHS = [1, 7, 4]  # words per text, [CLS] and [SEP] besides: a right-padded batch

CONFIG = tiny_blip_matching_config()
# other head splits (5 x 8 vision, 3 x 12 text), 3 text layers, 5 px patches
CONFIG_3_LAYERS = tiny_blip_matching_config(vision=dict(num_attention_heads=5, image_size=25, patch_size=5),
                                            text=dict(num_attention_heads=3, num_hidden_layers=3))
# name -> (transformers class, config)
MODELS = {
    "itm": (BlipForImageTextRetrieval, CONFIG),
    "itm-3-layers": (BlipForImageTextRetrieval, CONFIG_3_LAYERS),
    "blip-model": (BlipModel, CONFIG),
    "text-model": (BlipTextModel, CONFIG.text_config),
    "vision-model": (BlipVisionModel, CONFIG.vision_config),
}


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    made = {}

    def make(name):
        if name not in made:
            cls, config = MODELS[name]
            made[name] = tmp_path_factory.mktemp(name)
            tiny_blip_matching_model(cls, config).save_pretrained(made[name])
            if name != "text-model":  # a BlipTextModel folder is arrays only
                add_processor_files(made[name], getattr(config, "vision_config", config).image_size)
        return made[name]

    return make


def reference(folder, name, dtype="float32"):
    return MODELS[name][0].from_pretrained(folder, dtype=TORCH[dtype], attn_implementation="eager").eval()


def images(n, seed, size=IMAGE):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def texts(lengths, seed):
    """[CLS] n random word ids [SEP] per row, right-padded with [PAD]: BlipProcessor's layout."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths) + 2), BLIP_PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n + 2] = [2, *rng.integers(5, BLIP_BOS, size=n), BLIP_SEP]
        mask[row, :n + 2] = 1
    return ids, mask


def rel_error(ours, theirs, scale=None):
    theirs = theirs.detach().float().numpy().astype(np.float64)
    return np.abs(to_numpy(ours).astype(np.float64) - theirs).max() / (scale or np.abs(theirs).max())


def check(errors, dtype):
    for output, error in errors.items():
        LARGEST_ERRORS[output, dtype] = max(error, LARGEST_ERRORS.get((output, dtype), 0.0))
    assert max(errors.values()) < TOL[dtype], errors


def torch_inputs(pixels=None, ids=None, mask=None, dtype="float32"):
    inputs = dict(pixel_values=None if pixels is None else torch.from_numpy(pixels).to(TORCH[dtype]),
                  input_ids=None if ids is None else torch.from_numpy(ids),
                  attention_mask=None if mask is None else torch.from_numpy(mask))
    return {name: value for name, value in inputs.items() if value is not None}


# --- BlipForImageTextRetrieval -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", ["itm", "itm-3-layers"])
def test_image_text_matching_head_matches(folder, name, dtype):
    ours, theirs = miniblip2.load(folder(name), dtype=dtype), reference(folder(name), name, dtype)
    size = MODELS[name][1].vision_config.image_size
    pixels, (ids, mask) = images(3, seed=1, size=size), texts(TEXT_LENGTHS, seed=2)
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask, dtype))  # use_itm_head defaults to True
    got = ours.forward(pixels, ids, mask)
    tokens = (size // MODELS[name][1].vision_config.patch_size) ** 2 + 1
    assert got.itm_score.shape == (3, 2) and got.question_embeds.shape == (3, max(TEXT_LENGTHS) + 2, 36)
    assert got.last_hidden_state.shape == (3, tokens, 40)
    check({f"{name} itm_score": rel_error(got.itm_score, expected.itm_score),
           f"{name} itm question_embeds": rel_error(got.question_embeds, expected.question_embeds),
           f"{name} last_hidden_state": rel_error(got.last_hidden_state, expected.last_hidden_state)}, dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", ["itm", "itm-3-layers"])
def test_image_text_contrastive_head_matches(folder, name, dtype):
    ours, theirs = miniblip2.load(folder(name), dtype=dtype), reference(folder(name), name, dtype)
    pixels = images(2, seed=3, size=MODELS[name][1].vision_config.image_size)  # 2 images x 3 texts
    ids, mask = texts(TEXT_LENGTHS, seed=4)
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask, dtype), use_itm_head=False)
    got = ours.forward(pixels, ids, mask, use_itm_head=False)
    assert got.itm_score.shape == (2, 3)  # image-major, as `image_feat @ text_feat.t()`
    assert got.question_embeds.shape == (3, max(TEXT_LENGTHS) + 2, 36)  # the text alone
    check({f"{name} itc itm_score": rel_error(got.itm_score, expected.itm_score, scale=1.0),
           f"{name} itc question_embeds": rel_error(got.question_embeds, expected.question_embeds)}, dtype)


@pytest.mark.parametrize("n_images,n_texts", [(1, 3), (3, 1)])
def test_one_image_or_one_text_pairs_with_all_as_torch_broadcasts(folder, n_images, n_texts):
    """transformers' cross-attention broadcasts a batch of one against the other (torch.matmul):
    one image is scored with every text, one text with every image."""
    ours, theirs = miniblip2.load(folder("itm")), reference(folder("itm"), "itm")
    pixels, (ids, mask) = images(n_images, seed=5), texts(TEXT_LENGTHS[:n_texts], seed=6)
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask)).itm_score
    got = ours.forward(pixels, ids, mask).itm_score
    assert got.shape == (3, 2) == tuple(expected.shape)
    check({"itm broadcast itm_score": rel_error(got, expected)}, "float32")


def test_text_and_image_stages_are_transformers_modules(folder):
    """The stages on their own: the text encoder with and without the image, as transformers'
    text_encoder module gives them, and the vision tower."""
    ours, theirs = miniblip2.load(folder("itm")), reference(folder("itm"), "itm")
    pixels, (ids, mask) = images(3, seed=7), texts(TEXT_LENGTHS, seed=8)
    with torch.no_grad():
        image = theirs.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        with_image = theirs.text_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                         encoder_hidden_states=image).last_hidden_state
        alone = theirs.text_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ours_image = ours.vision(pixels)
    check({"vision stage": rel_error(ours_image, image),
           "text encoder with image": rel_error(ours.encode_text(ids, mask, ours_image), with_image),
           "text encoder alone": rel_error(ours.encode_text(ids, mask), alone.last_hidden_state)}, "float32")
    assert "pooler" not in ours.weights["text_encoder"]  # add_pooling_layer=False


# --- BlipModel, BlipTextModel, BlipVisionModel -----------------------------------------------------

@pytest.mark.parametrize("dtype", list(TOL))
def test_blip_model_matches(folder, dtype):
    ours = miniblip2.load(folder("blip-model"), dtype=dtype)
    theirs = reference(folder("blip-model"), "blip-model", dtype)
    pixels, (ids, mask) = images(2, seed=9), texts(TEXT_LENGTHS, seed=10)
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask, dtype))
        image = theirs.get_image_features(**torch_inputs(pixels, dtype=dtype))
        text = theirs.get_text_features(**torch_inputs(ids=ids, mask=mask))
        multimodal = theirs.get_multimodal_features(**torch_inputs(pixels[:1], ids, mask, dtype))
    got = ours.forward(pixels, ids, mask)
    assert got.logits_per_image.shape == (2, 3) and got.logits_per_text.shape == (3, 2)
    assert got.text_embeds.shape == (3, 22) and got.image_embeds.shape == (2, 22)
    got_image, got_text = ours.get_image_features(pixels), ours.get_text_features(ids, mask)
    got_multimodal = ours.get_multimodal_features(pixels[:1], ids, mask)  # one image for every text
    assert got_image.pooler_output.shape == (2, 22) and got_multimodal.shape == (3, 22)
    scale = float(theirs.logit_scale.detach().exp())  # the logits are cosines times this: their scale, as ITC's is 1
    check({"BlipModel logits_per_image": rel_error(got.logits_per_image, expected.logits_per_image, scale),
           "BlipModel logits_per_text": rel_error(got.logits_per_text, expected.logits_per_text, scale),
           "BlipModel text_embeds": rel_error(got.text_embeds, expected.text_embeds),
           "BlipModel image_embeds": rel_error(got.image_embeds, expected.image_embeds),
           "BlipModel text pooler_output": rel_error(got.text_model_output.pooler_output,
                                                     expected.text_model_output.pooler_output),
           "BlipModel text last_hidden_state": rel_error(got.text_model_output.last_hidden_state,
                                                         expected.text_model_output.last_hidden_state),
           "BlipModel vision pooler_output": rel_error(got.vision_model_output.pooler_output,
                                                       expected.vision_model_output.pooler_output),
           "BlipModel image features": rel_error(got_image.pooler_output, image.pooler_output),
           "BlipModel image features hidden": rel_error(got_image.last_hidden_state, image.last_hidden_state),
           "BlipModel text features": rel_error(got_text.pooler_output, text.pooler_output),
           "BlipModel text features hidden": rel_error(got_text.last_hidden_state, text.last_hidden_state),
           "BlipModel multimodal features": rel_error(got_multimodal, multimodal)}, dtype)


def test_blip_model_logits_are_the_scaled_cosines(folder):
    ours = miniblip2.load(folder("blip-model"))
    pixels, (ids, mask) = images(2, seed=11), texts(TEXT_LENGTHS, seed=12)
    got = ours.forward(pixels, ids, mask)
    np.testing.assert_allclose(np.linalg.norm(got.image_embeds, axis=-1), 1, rtol=1e-6)
    scale = np.exp(float(ours.weights["logit_scale"]))
    np.testing.assert_allclose(got.logits_per_image, scale * got.image_embeds @ got.text_embeds.T, rtol=1e-5)
    assert ours.weights["logit_scale"].shape == ()  # a scalar parameter, stored as one


# The text pooler is a dense layer and tanh on the [CLS] row, after every other rounding: in
# bfloat16 (8 bits of mantissa) torch's own pooled text is 3.1e-2 from its float32 one here, and
# two correct bf16 programs can sit that far apart on either side. So pooled outputs in half are
# held to a wider bar (6e-2) and, that it cannot hide a mistake, to being no farther from the
# float32 reference than torch's half is (x 1.5): ours measures 1.9e-2 where torch's is 3.1e-2.
POOLED_TOL = TOL | {"bfloat16": 6e-2}


def check_pooled(name, ours, theirs, truth, dtype):
    LARGEST_ERRORS[name, dtype] = max(rel_error(ours, theirs), LARGEST_ERRORS.get((name, dtype), 0.0))
    assert rel_error(ours, theirs) < POOLED_TOL[dtype], (name, rel_error(ours, theirs))
    if dtype != "float32":
        assert rel_error(ours, truth) <= 1.5 * rel_error(theirs.float(), truth), (name, rel_error(ours, truth))


@pytest.mark.parametrize("dtype", list(TOL))
def test_text_model_matches(folder, dtype):
    ours = miniblip2.load(folder("text-model"), dtype=dtype)
    ids, mask = texts(TEXT_LENGTHS, seed=13)
    context = np.random.default_rng(14).standard_normal((3, 26, 40)).astype(np.float32)  # 40: encoder_hidden_size
    expected = {}
    for run in dict.fromkeys(["float32", dtype]):
        theirs = reference(folder("text-model"), "text-model", run)
        with torch.no_grad():
            expected[run] = (theirs(**torch_inputs(ids=ids, mask=mask)),
                             theirs(**torch_inputs(ids=ids, mask=mask),
                                    encoder_hidden_states=torch.from_numpy(context).to(TORCH[run])))
    (alone, reading), (alone_32, reading_32) = expected[dtype], expected["float32"]
    got_alone, got_reading = ours.forward(ids, mask), ours.forward(ids, mask, encoder_hidden_states=context)
    assert got_alone.pooler_output.shape == (3, 36)
    check({"BlipTextModel last_hidden_state": rel_error(got_alone.last_hidden_state, alone.last_hidden_state),
           "BlipTextModel cross last_hidden_state": rel_error(got_reading.last_hidden_state,
                                                              reading.last_hidden_state)}, dtype)
    check_pooled("BlipTextModel pooler_output", got_alone.pooler_output, alone.pooler_output, alone_32.pooler_output,
                 dtype)
    check_pooled("BlipTextModel cross pooler_output", got_reading.pooler_output, reading.pooler_output,
                 reading_32.pooler_output, dtype)


@pytest.mark.parametrize("dtype", list(TOL))
def test_vision_model_matches(folder, dtype):
    ours = miniblip2.load(folder("vision-model"), dtype=dtype)
    theirs = reference(folder("vision-model"), "vision-model", dtype)
    pixels = images(2, seed=15)
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, dtype=dtype))
        interpolated = theirs(pixel_values=torch.from_numpy(images(1, seed=16, size=42)).to(TORCH[dtype]),
                              interpolate_pos_encoding=True)
    got = ours.forward(pixels)
    got_interpolated = ours.forward(images(1, seed=16, size=42), interpolate_pos_encoding=True)
    assert got.last_hidden_state.shape == (2, 26, 40) and got.pooler_output.shape == (2, 40)
    check({"BlipVisionModel last_hidden_state": rel_error(got.last_hidden_state, expected.last_hidden_state),
           "BlipVisionModel pooler_output": rel_error(got.pooler_output, expected.pooler_output),
           "BlipVisionModel interpolated": rel_error(got_interpolated.pooler_output, interpolated.pooler_output)},
          dtype)


def test_miniblip2_load_picks_the_class_from_config_json(folder):
    expected = {"itm": blip_retrieval.BlipRetrieval, "blip-model": blip_retrieval.BlipFeatures,
                "text-model": blip_retrieval.BlipText, "vision-model": blip_retrieval.BlipVision}
    for name, cls in expected.items():
        assert families.architecture(folder(name)) == MODELS[name][0].__name__  # as transformers writes it
        assert type(miniblip2.load(folder(name))) is cls
    assert miniblip2.load(folder("vision-model")).processor is not None  # preprocessor and tokenizer here
    assert miniblip2.load(folder("text-model")).processor is None  # arrays only: no preprocessor_config.json


def test_nothing_stays_float32(folder):
    half = miniblip2.load(folder("blip-model"), dtype="float16")
    assert half.weights["logit_scale"].dtype == np.float16  # BLIP has no _keep_in_fp32_modules
    assert half.weights["text_model"]["pooler"]["dense"]["weight"].dtype == np.float16


# --- what people do with it: processor, match, similarity, the CLI --------------------------------

CAPTIONS = ["a woman sitting on the beach with her dog", "two children", "the man riding a bicycle down a street"]


def picture(seed, size=(41, 37)):
    """A small RGB picture, not at the model's 30 x 30: the processor resizes it."""
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def test_processor_gives_blip_processors_ids_and_pixels(folder):
    ours = miniblip2.load(folder("itm"))
    theirs = BlipProcessor.from_pretrained(folder("itm"), backend="pil")  # PIL resizing, as miniblip2's
    expected = theirs(images=[picture(0)] * 3, text=CAPTIONS, padding=True, return_tensors="np")
    ids, mask = ours._text_inputs(CAPTIONS)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    np.testing.assert_array_equal(ours.processor(images=[picture(0)] * 3)["pixel_values"], expected["pixel_values"])


def test_match_and_similarity_are_the_heads_on_processed_inputs(folder):
    """match = softmax(itm_score)[:, 1] of the image with each text, similarity = the ITC
    itm_score, both as transformers computes them from BlipProcessor's inputs."""
    ours, theirs = miniblip2.load(folder("itm")), reference(folder("itm"), "itm")
    processor = BlipProcessor.from_pretrained(folder("itm"), backend="pil")
    with torch.no_grad():
        itm = theirs(**processor(images=[picture(1)] * 3, text=CAPTIONS, padding=True, return_tensors="pt"))
        itc = theirs(**processor(images=[picture(1), picture(2)], text=CAPTIONS, padding=True, return_tensors="pt"),
                     use_itm_head=False)
    probabilities = ours.match(picture(1), CAPTIONS)
    assert probabilities.shape == (3,) and rel_error(probabilities, itm.itm_score.softmax(dim=1)[:, 1]) < TOL["float32"]
    assert ours.match(picture(1), CAPTIONS[1]) == pytest.approx(float(probabilities[1]), rel=1e-5)  # one str: a float
    similarity = ours.similarity([picture(1), picture(2)], CAPTIONS)
    assert similarity.shape == (2, 3) and rel_error(similarity, itc.itm_score, 1.0) < TOL["float32"]


def test_blip_model_similarity_is_its_logits_unscaled(folder):
    ours = miniblip2.load(folder("blip-model"))
    pixels = ours.processor(images=[picture(3), picture(4)])["pixel_values"]
    logits = ours.forward(pixels, *ours._text_inputs(CAPTIONS)).logits_per_image
    scale = np.exp(float(ours.weights["logit_scale"]))
    np.testing.assert_allclose(ours.similarity([picture(3), picture(4)], CAPTIONS), logits / scale, rtol=1e-5)


def test_rank_texts_orders_by_the_matching_probability(folder):
    model = miniblip2.load(folder("itm"))
    ranked = retrieval.rank_texts(model, picture(5), CAPTIONS)
    assert sorted(m.text for m in ranked) == sorted(CAPTIONS)
    assert [m.probability for m in ranked] == sorted(model.match(picture(5), CAPTIONS).tolist(), reverse=True)
    alone = [model.similarity(picture(5), [m.text])[0, 0] for m in ranked]  # unpadded: the last bits may differ
    np.testing.assert_allclose([m.similarity for m in ranked], alone, rtol=1e-5)


def test_cli_match_prints_the_texts_ranked(folder, tmp_path, capsys):
    from PIL import Image
    path = tmp_path / "picture.png"
    Image.fromarray(picture(6)).save(path)
    assert cli.main(["match", str(path), *CAPTIONS, "--weights", str(folder("itm"))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = retrieval.rank_texts(miniblip2.load(folder("itm")), str(path), CAPTIONS)
    assert lines[0].split() == ["match", "similarity", "text"]
    assert [line.split(None, 2)[2] for line in lines[1:]] == [m.text for m in expected]
    assert [line.split()[0] for line in lines[1:]] == [f"{m.probability:.1%}" for m in expected]


def test_cli_match_on_a_blip_model_says_which_checkpoints_can(folder, tmp_path, capsys):
    from PIL import Image
    path = tmp_path / "picture.png"
    Image.fromarray(picture(7)).save(path)
    assert cli.main(["match", str(path), "a cat", "--weights", str(folder("blip-model"))]) == 2
    error = capsys.readouterr().err
    assert "BlipFeatures, which cannot match" in error and "blip-itm-base-coco" in error


# --- bad input: one MiniBlip2Error naming the argument, the value and what to do ------------------

def test_an_empty_text_list_is_refused(folder):
    model = miniblip2.load(folder("itm"))
    for call in (lambda: model.match(picture(8), []), lambda: model.similarity(picture(8), []),
                 lambda: retrieval.rank_texts(model, picture(8), [])):
        with pytest.raises(PromptError, match="texts is an empty list: give at least one text"):
            call()
    with pytest.raises(PromptError, match=r"input_ids must be a 2-D integer array .* at least one token"):
        model.forward(images(1, seed=8), np.zeros((0, 4), dtype=np.int64))
    with pytest.raises(ImageError, match="images is an empty list"):
        model.similarity([], CAPTIONS)


def test_image_and_text_batches_that_do_not_pair_are_refused(folder):
    model, features = miniblip2.load(folder("itm")), miniblip2.load(folder("blip-model"))
    ids, mask = texts(TEXT_LENGTHS, seed=9)
    with pytest.raises(PromptError, match=r"use_itm_head=True\) pairs image b with text b, but there are 2 images "
                                          r"\(pixel_values\) and 3 texts \(input_ids\).*use_itm_head=False"):
        model.forward(images(2, seed=9), ids, mask)
    assert model.forward(images(2, seed=9), ids, mask, use_itm_head=False).itm_score.shape == (2, 3)  # ITC: all
    with pytest.raises(PromptError, match=r"get_multimodal_features pairs image b with text b, but there are 2"):
        features.get_multimodal_features(images(2, seed=9), ids, mask)
    with pytest.raises(PromptError, match=r"attention_mask \(3, 8\) must have the shape of input_ids \(3, 9\)"):
        model.forward(images(3, seed=9), ids, mask[:, :8])
    with pytest.raises(PromptError, match=r"encoder_hidden_states has 2 rows for 3 texts"):
        miniblip2.load(folder("text-model")).forward(ids, mask, encoder_hidden_states=np.zeros((2, 5, 40), np.float32))


def test_a_text_longer_than_the_position_table_is_refused(folder):
    model = miniblip2.load(folder("itm"))
    long_text = " ".join(["dog"] * POSITIONS)  # [CLS] + 64 words + [SEP] = 66 tokens > 64 positions
    with pytest.raises(PromptError, match=r"texts\[1\] .* 66 tokens long, more than the 64 positions .* shorten"):
        model.match(picture(10), ["a dog", long_text])
    ids = np.full((1, POSITIONS + 1), 5)
    for call in (lambda: model.forward(images(1, seed=10), ids), lambda: model.forward(images(1, seed=10), ids,
                                                                                       use_itm_head=False),
                 lambda: miniblip2.load(folder("blip-model")).get_text_features(ids),
                 lambda: miniblip2.load(folder("text-model")).forward(ids)):
        with pytest.raises(PromptError, match=r"input_ids has 65 tokens per text, more than the text model's 64 "
                                              r"positions \(text_config.max_position_embeddings\)"):
            call()


def test_foreign_ids_and_bad_pixels_are_refused(folder, tmp_path):
    model = miniblip2.load(folder("itm"))
    with pytest.raises(PromptError, match=r"input_ids must lie in \[0, 120\), the text model's vocabulary "
                                              r"\(text_config.vocab_size\); found 0..120"):
        model.forward(images(1, seed=11), np.array([[0, BLIP_VOCAB_SIZE]]))
    with pytest.raises(ImageError, match=r"pixel_values must be a \[batch, 3, height, width\] array"):
        model.forward(np.zeros((1, 30, 30), np.float32), np.array([[2, 3]]))
    text_config = tiny_blip_config().text_config
    text_config.is_decoder = False  # BlipTextLayer then builds no cross-attention, and the file has none
    tiny_blip_matching_model(BlipTextModel, text_config).save_pretrained(tmp_path / "no-cross")
    text_model = miniblip2.load(tmp_path / "no-cross")
    assert "crossattention" not in text_model.weights["encoder"]["layer"][0]
    with pytest.raises(PromptError, match="encoder_hidden_states given, but this BlipTextModel has no cross-attention"):
        text_model.forward([[2, 3]], encoder_hidden_states=np.zeros((1, 2, 40), np.float32))


def test_a_captioning_checkpoint_cannot_rank_texts(tmp_path):
    from tiny import tiny_blip_model
    tiny_blip_model().save_pretrained(tmp_path / "caption")
    model = miniblip2.load(tmp_path / "caption")
    with pytest.raises(CheckpointError, match="Blip, which cannot match images and texts; load an image-text "
                                              "retrieval checkpoint .*blip-itm-base-coco"):
        retrieval.rank_texts(model, picture(12), ["a cat"])


def test_a_retrieval_config_without_cross_attention_is_refused(folder, tmp_path):
    shutil.copytree(folder("itm"), tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    config["text_config"]["is_decoder"] = False
    (tmp_path / "edited" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is_decoder is false"):
        miniblip2.load(tmp_path / "edited")


def test_a_tower_config_of_another_model_type_is_refused(folder, tmp_path):
    shutil.copytree(folder("text-model"), tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    config["model_type"] = "blip"
    (tmp_path / "edited" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'blip'; a BlipTextModel saved alone has 'blip_text_model'"):
        miniblip2.load(tmp_path / "edited")


def test_errors_are_miniblip2_errors():
    assert all(issubclass(e, MiniBlip2Error) for e in (CheckpointError, ImageError, PromptError))


# --- the model math reaches NumPy only through its namespace (see test_namespace.py) -----------

@pytest.mark.parametrize("dtype", list(TOL))
def test_forward_runs_through_the_namespace(folder, dtype):
    from strict_numpy import StrictArray, to_strict
    pixels, (ids, mask) = images(3, seed=13), texts(TEXT_LENGTHS, seed=14)
    plain = miniblip2.load(folder("itm"), dtype=dtype, device="cpu")
    strict = blip_retrieval.BlipRetrieval(plain.config, to_strict(plain.weights), plain.processor)
    for itm in (True, False):
        got = strict.forward(pixels.view(StrictArray), ids, mask, use_itm_head=itm)
        expected = plain.forward(pixels, ids, mask, use_itm_head=itm)
        for field in ("itm_score", "last_hidden_state", "question_embeds"):
            np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(expected, field))
    plain = miniblip2.load(folder("blip-model"), dtype=dtype, device="cpu")
    strict = blip_retrieval.BlipFeatures(plain.config, to_strict(plain.weights), plain.processor)
    got, expected = strict.forward(pixels.view(StrictArray), ids, mask), plain.forward(pixels, ids, mask)
    for field in ("logits_per_image", "text_embeds", "image_embeds"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(expected, field))
    np.testing.assert_array_equal(np.asarray(strict.get_multimodal_features(pixels[:1].view(StrictArray), ids, mask)),
                                  plain.get_multimodal_features(pixels[:1], ids, mask))


# --- the real blip-itm-base-coco and -large-coco layouts, at cut depth ---------------------------
# ../shared/reference holds no weights; its files say what the hub has: config.json (base: the
# sha-verified hub original; large: RECONSTRUCTED, size-verified), every weight name and shape
# (KEYS.*.tsv, GENERATED from transformers 5.23), tokenizer and preprocessor files. Both hubs
# hold only pytorch_model.bin (HUB-FILES.tsv), a 2022 torch.save of the state_dict with the
# int64 position_ids buffer: written here the same way (random weights, float32), the ViT cut to
# 1 layer and the text encoder to 2, and run by both libraries.

REAL = ["blip-itm-base-coco", "blip-itm-large-coco"]
CUT = {"vision_model.encoder.layers": 1, "text_encoder.encoder.layer": 2}


def real_keys(real):
    rows = [line.split("\t") for line in next(real.glob("KEYS.*.tsv")).read_text().splitlines()
            if line and not line.startswith(("#", "name\t"))]
    return {name: tuple(json.loads(shape)) for name, shape, _, kind in rows if kind.strip() == "param"}


def kept(name):
    for prefix, n in CUT.items():
        found = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
        if found:
            return int(found.group(1)) < n
    return True


@pytest.fixture(scope="module", params=REAL)
def real_layout(request, tmp_path_factory):
    real = REFERENCE / request.param
    if not real.is_dir():
        pytest.skip(f"{real} is absent (../shared/reference holds the real config and tokenizer files)")
    folder = tmp_path_factory.mktemp(f"{request.param}-cut")
    config = json.loads((real / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = CUT["vision_model.encoder.layers"]
    config["text_config"]["num_hidden_layers"] = CUT["text_encoder.encoder.layer"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.txt"):
        shutil.copy(real / name, folder / name)
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in real_keys(real).items():
        if kept(name):
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if name.endswith(("LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
                values += 1  # layer norm scales near 1, as trained ones are
            state[name] = torch.from_numpy(values)
    torch.save(state | {"text_encoder.embeddings.position_ids": torch.arange(512)[None]}, folder / "pytorch_model.bin")
    return real, folder, state


def test_real_layout_loads_through_the_coverage_check(real_layout):
    real, folder, state = real_layout
    large = "large" in real.name
    assert len(real_keys(real)) == (616 if large else 472)  # CHECKPOINTS.md 7.3
    # cut: ViT layers 1.. (12 tensors each), text layers 2..11 (26 tensors each, cross-attention included)
    assert len(state) == len(real_keys(real)) - (23 if large else 11) * 12 - 10 * 26
    ours = miniblip2.load(folder)
    assert type(ours) is blip_retrieval.BlipRetrieval
    vision, text = ours.config.vision, ours.config.text
    assert (vision.image_size, vision.patch_size, vision.layer_norm_eps) == (384, 16, 1e-5)
    assert text.encoder_hidden_size == vision.hidden_size == (1024 if large else 768)
    assert (text.num_attention_heads, text.vocab_size, ours.config.image_text_hidden_size) == (12, 30524, 256)
    assert ours.weights["text_encoder"]["encoder"]["layer"][1]["crossattention"]["self"]["key"]["weight"].shape == (
        768, vision.hidden_size)
    assert ours.weights["vision_proj"]["weight"].shape == (256, vision.hidden_size)


@pytest.mark.parametrize("use_itm_head", [True, False], ids=["itm", "itc"])
def test_real_layout_matches_transformers(real_layout, use_itm_head):
    real, folder, _ = real_layout
    ours = miniblip2.load(folder)
    theirs = BlipForImageTextRetrieval.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    pixels = np.random.default_rng(1).standard_normal((2, 3, 384, 384)).astype(np.float32)
    ids = np.array([[101, 1037, 2450, 1998, 2014, 3899, 3564, 1999, 1037, 3509, 102],  # "A woman and her dog
                    [101, 1037, 4937, 102, 0, 0, 0, 0, 0, 0, 0]])  # sitting in a beach", "a cat" (CHECKPOINTS.md 7.4)
    mask = (np.arange(11) < np.array([[11], [4]])).astype(np.int64)
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask), use_itm_head=use_itm_head)
    got = ours.forward(pixels, ids, mask, use_itm_head=use_itm_head)
    head = "itm" if use_itm_head else "itc"
    check({f"real {real.name} {head} itm_score": rel_error(got.itm_score, expected.itm_score,
                                                            None if use_itm_head else 1.0),
           f"real {real.name} {head} question_embeds": rel_error(got.question_embeds, expected.question_embeds)},
          "float32")


def test_real_processor_gives_blip_processors_ids_and_pixels(real_layout):
    from PIL import Image
    _, folder, _ = real_layout
    ours = miniblip2.load(folder)
    theirs = BlipProcessor.from_pretrained(folder, backend="pil")
    image = Image.open(Path(__file__).resolve().parents[1] / "docs" / "example.png")
    sentences = ["A woman and her dog sitting in a beach", "Ünïcödé CAFÉ naïve", "two cats, [SEP] 中文"]
    expected = theirs(images=[image] * 3, text=sentences, padding=True, return_tensors="np")
    ids, mask = ours._text_inputs(sentences)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    np.testing.assert_array_equal(ours.processor(images=[image] * 3)["pixel_values"], expected["pixel_values"])
    assert ids[0, :11].tolist() == [101, 1037, 2450, 1998, 2014, 3899, 3564, 1999, 1037, 3509, 102]  # 7.4, SEEN
    assert "token_type_ids" not in ours.processor(text=sentences)  # BlipProcessor drops them


@pytest.fixture(scope="module", autouse=True)
def error_table():
    """With -s: the largest relative error per output and dtype, the figures the bars are about."""
    yield
    if LARGEST_ERRORS:
        print("\nlargest relative error vs transformers:")
        for (output, dtype), error in sorted(LARGEST_ERRORS.items(), key=lambda item: (item[0][1], item[0][0])):
            print(f"  {output:>45} {dtype:>9}: {error:.1e}")
