"""BLIP-2's first stage against transformers: Blip2ForImageTextRetrieval (ITM and ITC heads, with
and without `image_token_index`), Blip2TextModelWithProjection, Blip2VisionModelWithProjection
and Blip2Model's features, as tiny random checkpoints on disk loaded by both libraries; then the
real blip2-itm-vit-g layout at cut depth, the API (`match`, `similarity`), the CLI and bad input.

Relative error = max|ours - reference| / max|reference|, as in test_parity.py. float32: 1e-4, the
project's parity bar (these few-layer models round to about 1e-6; a wrong mask, a missing
position or the wrong feed-forward for a row gives 1e-2 or more). float16 and bfloat16 are held
to test_precision.py's few-ulp bars (5e-3 and 4e-2), for the reasons given there; ITC logits are
cosines, so their error is measured against 1 rather than the batch's largest cosine. Part of
the half-precision distance is one rounding: torch's CPU half `nn.Linear` adds the bias before
rounding once, nn.linear rounds the product and then the sum (up to 3 float16 ulps here).

The texts come in padded batches of different lengths: padding rows are computed by both
libraries (they still attend to the real tokens), so every row is compared, padding included.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

import miniblip2
from miniblip2 import blip2_retrieval, cli, families, retrieval
from miniblip2.checkpoint.safetensors import load_checkpoint, save_safetensors
from miniblip2.errors import CheckpointError, ImageError, MiniBlip2Error, PromptError
from miniblip2.runtime.device import to_numpy
from miniblip2.runtime.trace import PROBS, recording
from miniblip2.testing.tiny_tokenizer import (
    build_tiny_bert_tokenizer,
    build_tiny_processor_files,
)

TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 4e-2}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LARGEST_ERRORS = {}  # (output, dtype) -> largest relative error seen, printed by conftest-like hook below

VOCAB, POSITIONS, Q = 97, 29, 5  # every width differs: vision 40/37, Q-Former 24/50, embeddings 14
CLS, SEP, PAD = 2, 3, 0
IMAGE_TOKEN = VOCAB  # one past the Q-Former's vocabulary, as the PR revision's 30523 is
TEXT_LENGTHS = [3, 9, 6]  # tokens per text, [CLS] and [SEP] included: a right-padded batch


def tiny_config(image_token_index=None, text=None):
    vision = dict(hidden_size=40, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                  patch_size=6)
    qformer = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=50,
                   cross_attention_frequency=2, use_qformer_text_input=True, vocab_size=VOCAB,
                   max_position_embeddings=POSITIONS)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text or dict(model_type="opt"),
                       num_query_tokens=Q, image_text_hidden_size=14, image_token_index=image_token_index)


OPT_TEXT = dict(model_type="opt", vocab_size=53, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=44, max_position_embeddings=40, eos_token_id=3)
T5_TEXT = dict(model_type="t5", vocab_size=53, d_model=36, d_kv=7, num_heads=5, d_ff=29, num_layers=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
               dense_act_fn="gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)

# name -> (transformers class, config)
MODELS = {
    "itm": (Blip2ForImageTextRetrieval, tiny_config()),
    "itm-image-token": (Blip2ForImageTextRetrieval, tiny_config(image_token_index=IMAGE_TOKEN)),
    "text-projection": (Blip2TextModelWithProjection, tiny_config()),
    "vision-projection": (Blip2VisionModelWithProjection, tiny_config()),
    "blip2-model-opt": (Blip2Model, tiny_config(text=OPT_TEXT)),
    "blip2-model-t5": (Blip2Model, tiny_config(text=T5_TEXT)),
}


def randomised(model, seed=0):
    """transformers starts biases at 0, layer norms at 1 and the query tokens at 0: every
    parameter is re-drawn so that each one matters to the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = ("norm" in name.lower() or "LayerNorm" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm_scale else 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    made = {}

    def make(name):
        if name not in made:
            cls, config = MODELS[name]
            made[name] = tmp_path_factory.mktemp(name)
            randomised(cls(config)).save_pretrained(made[name])
            if name in ("itm", "itm-image-token", "text-projection"):
                write_processor_files(made[name], with_placeholders=name == "itm-image-token")
        return made[name]

    return make


def write_processor_files(folder, with_placeholders):
    """blip2-itm-vit-g's tokenizer and preprocessor files, tiny; processor_config.json (Q
    placeholders per text) only where the config has image_token_index, as in the PR revision."""
    assert build_tiny_bert_tokenizer(folder, VOCAB) == VOCAB - 1  # [DEC]
    build_tiny_processor_files(folder, image_size=30, num_query_tokens=Q)
    if not with_placeholders:
        (folder / "processor_config.json").unlink()  # as on the hub: Blip2Processor puts none


def reference(folder, name, dtype="float32"):
    cls = MODELS[name][0]
    return cls.from_pretrained(folder, dtype=TORCH[dtype], attn_implementation="eager").eval()


def images(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, 30, 30)).astype(np.float32)


def texts(lengths, seed, image_tokens=False):
    """[CLS] random ids [SEP], right-padded with 0; with image_tokens, Q placeholders in front
    (mask 1), as Blip2Processor builds them when it knows num_query_tokens."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = [CLS, *rng.integers(4, VOCAB, size=n - 2), SEP]
        mask[row, :n] = 1
    if image_tokens:
        ids = np.concatenate([np.full((len(lengths), Q), IMAGE_TOKEN), ids], axis=1)
        mask = np.concatenate([np.ones((len(lengths), Q), dtype=np.int64), mask], axis=1)
    return ids, mask


def as_numpy(tensor):
    return tensor.detach().float().numpy()


def rel_error(ours, theirs, scale=None):
    theirs = as_numpy(theirs).astype(np.float64)
    return np.abs(to_numpy(ours).astype(np.float64) - theirs).max() / (scale or np.abs(theirs).max())


# ITC logits are cosines, in [-1, 1], and their rounding is set by that scale: a batch whose
# largest cosine is 0.27 would otherwise turn 2 float16 ulps of an embedding into 3e-3.
COSINE_SCALE = {"logits_per_image": 1.0, "logits_per_text": 1.0}


def check(errors, dtype):
    for output, error in errors.items():
        LARGEST_ERRORS[output, dtype] = max(error, LARGEST_ERRORS.get((output, dtype), 0.0))
    assert max(errors.values()) < TOL[dtype], errors


def torch_inputs(pixels, ids, mask, dtype):
    return dict(pixel_values=torch.from_numpy(pixels).to(TORCH[dtype]), input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask))


FIELDS = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]


# --- Blip2ForImageTextRetrieval ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", ["itm", "itm-image-token"])
def test_image_text_matching_head_matches(folder, name, dtype):
    ours, theirs = miniblip2.load(folder(name), dtype=dtype), reference(folder(name), name, dtype)
    pixels = images(3, seed=1)
    ids, mask = texts(TEXT_LENGTHS, seed=2, image_tokens=name == "itm-image-token")
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask, dtype), use_image_text_matching_head=True)
    got = ours.forward(pixels, ids, mask, use_image_text_matching_head=True)
    assert got.logits_per_image.shape == (3, 2) and got.logits_per_text.shape == (2, 3)
    assert got.text_embeds.shape == (3, Q + max(TEXT_LENGTHS), 24)  # the Q-Former output: queries, then text
    assert got.image_embeds.shape == (3, 26, 40)  # the ViT's output: transformers' name for it here
    check({f"itm {f}": rel_error(getattr(got, f), getattr(expected, f)) for f in FIELDS}, dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", ["itm", "itm-image-token"])
def test_image_text_contrastive_head_matches(folder, name, dtype):
    ours, theirs = miniblip2.load(folder(name), dtype=dtype), reference(folder(name), name, dtype)
    pixels = images(2, seed=3)  # 2 images x 3 texts: ITC scores every pair
    ids, mask = texts(TEXT_LENGTHS, seed=4, image_tokens=name == "itm-image-token")
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask, dtype))  # the default head is ITC
    got = ours.forward(pixels, ids, mask)
    assert got.logits_per_image.shape == (2, 3) and got.logits_per_text.shape == (3, 2)
    assert got.text_embeds.shape == (3, 14) and got.image_embeds.shape == (2, Q, 14)
    check({f"itc {f}": rel_error(getattr(got, f), getattr(expected, f), COSINE_SCALE.get(f)) for f in FIELDS}, dtype)


def test_the_qformer_stays_float32_in_float16_only(folder):
    half, bf16 = miniblip2.load(folder("itm"), dtype="float16"), miniblip2.load(folder("itm"), dtype="bfloat16")
    assert half.weights["qformer"]["layernorm"]["weight"].dtype == np.float32
    assert half.weights["query_tokens"].dtype == np.float32
    assert half.weights["embeddings"]["word_embeddings"]["weight"].dtype == np.float16  # not kept, as there
    assert half.weights["itm_head"]["weight"].dtype == np.float16
    assert bf16.weights["qformer"]["layernorm"]["weight"].dtype == np.uint16  # bf16 bits: nothing kept for bf16


# --- the projection models and Blip2Model -------------------------------------------------------

@pytest.mark.parametrize("dtype", list(TOL))
def test_text_model_with_projection_matches(folder, dtype):
    ours, theirs = miniblip2.load(folder("text-projection"), dtype=dtype), reference(
        folder("text-projection"), "text-projection", dtype)
    ids, mask = texts(TEXT_LENGTHS, seed=5)
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = ours.forward(ids, mask)
    assert got.text_embeds.shape == (3, max(TEXT_LENGTHS), 14)  # every token, as transformers gives it
    check({"text-projection text_embeds": rel_error(got.text_embeds, expected.text_embeds),
           "text-projection last_hidden_state": rel_error(got.last_hidden_state, expected.last_hidden_state)}, dtype)


@pytest.mark.parametrize("dtype", list(TOL))
def test_vision_model_with_projection_matches(folder, dtype):
    ours, theirs = miniblip2.load(folder("vision-projection"), dtype=dtype), reference(
        folder("vision-projection"), "vision-projection", dtype)
    pixels = images(2, seed=6)
    with torch.no_grad():
        expected = theirs(pixel_values=torch.from_numpy(pixels).to(TORCH[dtype]))
    got = ours.forward(pixels)
    assert got.image_embeds.shape == (2, Q, 14) and got.last_hidden_state.shape == (2, 26, 40)
    check({"vision-projection image_embeds": rel_error(got.image_embeds, expected.image_embeds),
           "vision-projection last_hidden_state": rel_error(got.last_hidden_state, expected.last_hidden_state)}, dtype)


@pytest.mark.parametrize("name,dtype", [("blip2-model-opt", "float32"), ("blip2-model-t5", "float32"),
                                        ("blip2-model-opt", "float16"), ("blip2-model-t5", "bfloat16")])
def test_blip2_model_features_match(folder, name, dtype):
    ours, theirs = miniblip2.load(folder(name), dtype=dtype), reference(folder(name), name, dtype)
    pixels = images(2, seed=7)
    ids, mask = texts([4, 7], seed=8)
    with torch.no_grad():
        image = theirs.get_image_features(pixel_values=torch.from_numpy(pixels).to(TORCH[dtype]))
        qformer = theirs.get_qformer_features(pixel_values=torch.from_numpy(pixels).to(TORCH[dtype]))
    assert qformer.dtype == (torch.float32 if dtype == "float16" else TORCH[dtype])  # not cast back down
    assert ours.get_qformer_features(pixels).dtype == np.float32  # so here too (bf16 values are float32 arrays)
    with torch.no_grad():
        text = theirs.get_text_features(input_ids=torch.from_numpy(ids) % 53, attention_mask=torch.from_numpy(mask))
    got_image = ours.get_image_features(pixels)
    got_text = ours.get_text_features(ids % 53, mask)
    assert got_text.pooler_output is None and text.pooler_output is None
    check({"Blip2Model image last_hidden_state": rel_error(got_image.last_hidden_state, image.last_hidden_state),
           "Blip2Model image pooler_output": rel_error(got_image.pooler_output, image.pooler_output),
           "Blip2Model qformer features": rel_error(ours.get_qformer_features(pixels), qformer),
           # right padding: the padded rows still read the real tokens before them, so all rows compare
           "Blip2Model text last_hidden_state": rel_error(got_text.last_hidden_state, text.last_hidden_state)}, dtype)


def test_miniblip2_load_picks_the_class_from_config_json(folder):
    expected = {"itm": blip2_retrieval.Blip2Retrieval, "text-projection": blip2_retrieval.Blip2TextWithProjection,
                "vision-projection": blip2_retrieval.Blip2VisionWithProjection,
                "blip2-model-opt": blip2_retrieval.Blip2Features}
    for name, cls in expected.items():
        assert families.architecture(folder(name)) == MODELS[name][0].__name__
        assert type(miniblip2.load(folder(name))) is cls


def test_trace_names_are_checkpoint_paths(folder):
    model = miniblip2.load(folder("itm"))
    ids, mask = texts(TEXT_LENGTHS, seed=9)
    with recording(model) as records:
        model.forward(images(3, seed=9), ids, mask, use_image_text_matching_head=True)
    names = {name.removesuffix(PROBS) for name in records}
    assert {"embeddings", "qformer.layernorm", "qformer.encoder.layer.0.crossattention", "vision_model.post_layernorm"} <= names
    keys = set(load_checkpoint(folder("itm")))
    for name in names:
        assert any(key.startswith(name + ".") for key in keys), name
    last = "qformer.encoder.layer.2"
    assert records[last][0].shape == (3, Q + max(TEXT_LENGTHS), 24)  # queries and text, one sequence



# --- what people do with it: processor, match, similarity, the CLI ------------------------------

CAPTIONS = ["a woman sitting on the beach with her dog", "two children", "the man riding a bicycle down a street"]


def picture(seed, size=(41, 37)):
    """A small RGB picture, not at the model's 30 x 30: the processor resizes it."""
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["itm", "itm-image-token"])
def test_processor_gives_blip2_processors_ids(folder, name):
    from transformers import Blip2Processor
    ours = miniblip2.load(folder(name))
    theirs = Blip2Processor.from_pretrained(folder(name))
    expected = theirs(images=[picture(0)] * 3, text=CAPTIONS, padding=True, return_tensors="np")
    ids, mask = ours._text_inputs(CAPTIONS, with_images=True)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids.shape[1] == (Q if name == "itm-image-token" else 0) + len(ours.processor.tokenizer.encode(CAPTIONS[2]))


@pytest.mark.parametrize("name", ["itm", "itm-image-token"])
def test_match_and_similarity_are_the_heads_on_processed_inputs(folder, name):
    """match = softmax(ITM logits)[:, 1] of the image repeated once per text, similarity = the ITC
    logits, both as transformers computes them from Blip2Processor's inputs."""
    from transformers import Blip2Processor
    ours, theirs = miniblip2.load(folder(name)), reference(folder(name), name)
    processor = Blip2Processor.from_pretrained(folder(name))
    image = picture(1)
    with torch.no_grad():
        inputs = processor(images=[image] * 3, text=CAPTIONS, padding=True, return_tensors="pt")
        itm = theirs(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(dim=1)[:, 1]
        itc = theirs(**processor(images=[image, picture(2)], text=CAPTIONS, padding=True, return_tensors="pt"))
    probabilities = ours.match(image, CAPTIONS)
    assert probabilities.shape == (3,) and rel_error(probabilities, itm) < TOL["float32"]
    assert ours.match(image, CAPTIONS[1]) == pytest.approx(float(probabilities[1]), rel=1e-5)  # one str: a float
    similarity = ours.similarity([image, picture(2)], CAPTIONS)
    assert similarity.shape == (2, 3) and rel_error(similarity, itc.logits_per_image, 1.0) < TOL["float32"]


def test_rank_texts_orders_by_the_matching_probability(folder):
    model = miniblip2.load(folder("itm"))
    ranked = retrieval.rank_texts(model, picture(3), CAPTIONS)
    assert sorted(m.text for m in ranked) == sorted(CAPTIONS)
    assert [m.probability for m in ranked] == sorted(model.match(picture(3), CAPTIONS).tolist(), reverse=True)
    alone = [model.similarity(picture(3), [m.text])[0, 0] for m in ranked]  # unpadded: the last bits may differ
    np.testing.assert_allclose([m.similarity for m in ranked], alone, rtol=1e-5)


def test_cli_match_prints_the_texts_ranked(folder, tmp_path, capsys):
    from PIL import Image
    path = tmp_path / "picture.png"
    Image.fromarray(picture(4)).save(path)
    assert cli.main(["match", str(path), *CAPTIONS, "--weights", str(folder("itm"))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model = miniblip2.load(folder("itm"))
    expected = retrieval.rank_texts(model, str(path), CAPTIONS)
    assert lines[0].split() == ["match", "similarity", "text"]
    assert [line.split(None, 2)[2] for line in lines[1:]] == [m.text for m in expected]
    assert [line.split()[0] for line in lines[1:]] == [f"{m.probability:.1%}" for m in expected]


def test_cli_match_on_a_captioning_checkpoint_says_so(checkpoint, tmp_path, capsys):
    from PIL import Image
    path = tmp_path / "picture.png"
    Image.fromarray(picture(5)).save(path)
    assert cli.main(["match", str(path), "a cat", "--weights", str(checkpoint())]) == 2
    error = capsys.readouterr().err
    assert "Blip2ForConditionalGeneration" in error and "cannot score" in error and "blip2-itm-vit-g" in error


# --- bad input: one MiniBlip2Error naming the argument, the value and what to do -----------------

def test_a_text_longer_than_the_position_table_is_refused(folder):
    model = miniblip2.load(folder("itm"))
    long_text = " ".join(["dog"] * POSITIONS)  # [CLS] + 29 words + [SEP] = 31 tokens > 29 positions
    with pytest.raises(PromptError, match=r"texts\[1\] .* 31 tokens long, more than the 29 positions .* shorten"):
        model.match(picture(6), ["a dog", long_text])
    ids = np.ones((1, POSITIONS + 1), dtype=np.int64)
    with pytest.raises(PromptError, match=r"input_ids has 30 tokens per text, more than the Q-Former's 29 positions"):
        model.forward(images(1, seed=6), ids)
    text_model = miniblip2.load(folder("text-projection"))
    with pytest.raises(PromptError, match=r"30 tokens .*qformer_config.max_position_embeddings"):
        text_model.forward(ids)


def test_an_empty_text_list_is_refused(folder):
    model = miniblip2.load(folder("itm"))
    for call in (lambda: model.match(picture(7), []), lambda: model.similarity(picture(7), []),
                 lambda: retrieval.rank_texts(model, picture(7), [])):
        with pytest.raises(PromptError, match="texts is an empty list: give at least one text"):
            call()
    with pytest.raises(PromptError, match="input_ids must be a 2-D integer array .* at least one text"):
        model.forward(images(1, seed=7), np.zeros((0, 4), dtype=np.int64))
    with pytest.raises(ImageError, match="images is an empty list"):
        model.similarity([], CAPTIONS)


def test_image_and_text_batches_that_do_not_pair_are_refused(folder):
    model = miniblip2.load(folder("itm"))
    ids, mask = texts(TEXT_LENGTHS, seed=8)
    with pytest.raises(PromptError, match=r"2 images \(pixel_values\) and 3 texts \(input_ids\); give one text "
                                          r"per image, or use_image_text_matching_head=False"):
        model.forward(images(2, seed=8), ids, mask, use_image_text_matching_head=True)
    assert model.forward(images(2, seed=8), ids, mask).logits_per_image.shape == (2, 3)  # ITC pairs all
    with pytest.raises(PromptError, match=r"attention_mask \(3, 8\) must have the shape of input_ids \(3, 9\)"):
        model.forward(images(3, seed=8), ids, mask[:, :8], use_image_text_matching_head=True)


def test_missing_placeholders_and_foreign_ids_are_refused(folder):
    model = miniblip2.load(folder("itm-image-token"))
    ids, mask = texts(TEXT_LENGTHS, seed=9)  # no placeholders in front, though the config has image_token_index
    with pytest.raises(PromptError, match=f"input_ids must start with the {Q} image placeholders \\(id {IMAGE_TOKEN}"):
        model.forward(images(3, seed=9), ids, mask)
    with pytest.raises(PromptError, match=r"input_ids must lie in \[0, 97\), the Q-Former's vocabulary; found 0..97"):
        miniblip2.load(folder("itm")).forward(images(1, seed=9), np.array([[0, VOCAB]]))


def test_a_captioning_only_checkpoint_cannot_match(checkpoint):
    model = miniblip2.load(checkpoint())
    for call in (lambda: retrieval.rank_texts(model, picture(10), ["a cat"]), lambda: model.match(picture(10), ["a"]),
                 lambda: model.similarity([picture(10)], ["a cat"])):
        with pytest.raises(CheckpointError, match="cannot score image-text pairs; load an image-text retrieval"):
            call()


def test_an_old_config_without_the_text_feed_forward_is_refused(folder, tmp_path):
    """The first hub revision spelt the key `qformer_text_input`: transformers ignores it and
    builds a Q-Former that cannot read text."""
    shutil.copytree(folder("itm"), tmp_path / "old", dirs_exist_ok=True)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["qformer_config"]["qformer_text_input"] = config["qformer_config"].pop("use_qformer_text_input")
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_qformer_text_input is false .*old key `qformer_text_input`"):
        miniblip2.load(tmp_path / "old")


def test_errors_are_miniblip2_errors():
    assert all(issubclass(e, MiniBlip2Error) for e in (CheckpointError, ImageError, PromptError))


# --- the model math reaches NumPy only through its namespace (see test_namespace.py) -----------

@pytest.mark.parametrize("dtype", list(TOL))
def test_forward_runs_through_the_namespace(folder, dtype):
    from strict_numpy import StrictArray, to_strict
    plain = miniblip2.load(folder("itm-image-token"), dtype=dtype, device="cpu")
    strict = blip2_retrieval.Blip2Retrieval(plain.config, to_strict(plain.weights), plain.processor)
    pixels = images(3, seed=11)
    ids, mask = texts(TEXT_LENGTHS, seed=12, image_tokens=True)
    for itm in (True, False):
        got = strict.forward(pixels.view(StrictArray), ids, mask, use_image_text_matching_head=itm)
        expected = plain.forward(pixels, ids, mask, use_image_text_matching_head=itm)
        for field in FIELDS:
            np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(expected, field))


def test_model_code_converts_to_numpy_only_through_to_numpy():
    for name in ("bert.py", "qformer.py", "blip2_retrieval.py", "retrieval.py"):
        code = (Path(miniblip2.__file__).parent / name).read_text()
        assert not re.findall(r"np\.(?:asarray|array|ascontiguousarray)\(", code), name



# --- the real blip2-itm-vit-g layout, at cut depth -----------------------------------------------
# ../shared/reference/blip2-itm-vit-g holds no weights; its files say what the hub has:
# config.json RECONSTRUCTED from the hub page (size-verified), the 809 names and shapes GENERATED
# from transformers 5.23 (KEYS.*.tsv; they reproduce the hub file's size exactly), and tokenizer
# and preprocessor files RECONSTRUCTED or INFERRED (HUB-FILES.tsv). A checkpoint is written with
# those names and shapes (random weights, float32 as on the hub), the ViT cut to 1 layer and the
# Q-Former to 2 (one with cross-attention, one without), and run by both libraries.

REAL = REFERENCE / "blip2-itm-vit-g"
CUT = {"vision_model.encoder.layers": 1, "qformer.encoder.layer": 2}
TOKENIZER_FILES = ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "preprocessor_config.json"]
needs_reference = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/reference/blip2-itm-vit-g is absent")


def real_keys():
    """{name: shape} from KEYS.Blip2ForImageTextRetrieval.transformers-5.23.GENERATED.tsv."""
    rows = [line.split("\t") for line in next(REAL.glob("KEYS.*.tsv")).read_text().splitlines()
            if line and not line.startswith(("#", "name\t"))]
    return {name: tuple(json.loads(shape)) for name, shape, *_ in rows}


def kept(name):
    for prefix, n in CUT.items():
        found = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
        if found:
            return int(found.group(1)) < n
    return True


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip2-itm-vit-g-cut")
    config = json.loads((REAL / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = CUT["vision_model.encoder.layers"]
    config["qformer_config"]["num_hidden_layers"] = CUT["qformer.encoder.layer"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(REAL / name, folder / name)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in real_keys().items():
        if kept(name):
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if name.endswith(("norm.weight", "LayerNorm.weight", "layernorm.weight", "layer_norm1.weight",
                              "layer_norm2.weight")):
                values += 1  # layer norm scales near 1, as trained ones are
            tensors[name] = values
    save_safetensors(folder / "model.safetensors", tensors)
    return folder, tensors


@needs_reference
def test_real_layout_loads_through_the_coverage_check(real_layout):
    folder, tensors = real_layout
    # 38 ViT layers of 12 tensors cut, and Q-Former layers 2..11: 32 tensors with cross-attention, 22 without
    assert len(real_keys()) == 809 and len(tensors) == 809 - 38 * 12 - (5 * 32 + 5 * 22)
    model = miniblip2.load(folder)
    assert type(model) is blip2_retrieval.Blip2Retrieval
    assert model.config.qformer.vocab_size == 30523 and model.config.image_token_index is None
    assert model.weights["embeddings"]["word_embeddings"]["weight"].shape == (30523, 768)
    assert model.weights["vision_model"]["embeddings"]["position_embedding"].shape == (1, 257, 1408)
    assert "intermediate" in model.weights["qformer"]["encoder"]["layer"][1]  # the text FFN, in every layer
    assert model.processor.num_query_tokens == 0  # no image_token_index: no placeholders, as upstream


@needs_reference
@pytest.mark.parametrize("use_itm", [True, False], ids=["itm", "itc"])
def test_real_layout_matches_transformers(real_layout, use_itm):
    folder, _ = real_layout
    ours = miniblip2.load(folder)
    theirs = Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    pixels = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ids = np.array([[101, 1037, 2450, 1998, 2014, 3899, 3564, 1999, 1037, 3509, 102],  # "A woman and her dog
                    [101, 1037, 4937, 102, 0, 0, 0, 0, 0, 0, 0]])  # sitting in a beach", "a cat" (CHECKPOINTS.md 7.4)
    mask = (np.arange(11) < np.array([[11], [4]])).astype(np.int64)
    with torch.no_grad():
        expected = theirs(**torch_inputs(pixels, ids, mask, "float32"), use_image_text_matching_head=use_itm)
    got = ours.forward(pixels, ids, mask, use_image_text_matching_head=use_itm)
    head = "itm" if use_itm else "itc"
    check({f"real {head} {f}": rel_error(getattr(got, f), getattr(expected, f), None if use_itm else COSINE_SCALE.get(f))
           for f in FIELDS}, "float32")


# Hard cases for BERT's pipeline: case and accents, CJK spacing, control and zero-width
# characters, punctuation runs, the special tokens typed in the text (matched only as written),
# words too long for WordPiece (> 100 characters: [UNK]), and unknown characters.
TOKENIZER_CASES = [
    "A woman and her dog sitting in a beach", "two cats laying on a pink blanket", "Ünïcödé CAFÉ naïve résumé",
    "中文字符 and 日本語 mixed", "tab\tnew\nline\r\x00zero\u200bwidth", "what?!... (really) -- yes; no: 'maybe'",
    "[CLS] [SEP] [MASK] [PAD] [UNK] [DEC] [cls] <image>", "x" * 101, "x" * 100, "😀 emoji 🐶", "", "   ",
    "don't won't it's", "1,234.56 $7 #8 @home", "ﬁ ligature ß straße",
]


@needs_reference
def test_real_tokenizer_ids_are_bert_tokenizers():
    from transformers import AutoTokenizer

    from miniblip2.checkpoint.tokenizer import load_tokenizer
    theirs, ours = AutoTokenizer.from_pretrained(REAL), load_tokenizer(REAL)
    assert type(theirs).__name__ == "BertTokenizer" and ours.vocab_size == len(theirs) == 30523
    for text in TOKENIZER_CASES:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        ids = theirs(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("A woman and her dog sitting in a beach") == [101, 1037, 2450, 1998, 2014, 3899, 3564, 1999,
                                                                      1037, 3509, 102]  # CHECKPOINTS.md 7.4, SEEN
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 30522, 102)


@needs_reference
def test_real_processor_gives_blip2_processors_inputs(real_layout):
    from PIL import Image
    from transformers import Blip2Processor
    folder, _ = real_layout
    ours = miniblip2.load(folder)
    theirs = Blip2Processor.from_pretrained(folder, backend="pil")  # PIL resizing, as miniblip2 (not torchvision)
    image = Image.open(Path(__file__).resolve().parents[1] / "docs" / "example.png")
    expected = theirs(images=[image] * 3, text=TOKENIZER_CASES[:3], padding=True, return_tensors="np")
    ids, mask = ours._text_inputs(TOKENIZER_CASES[:3], with_images=True)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    np.testing.assert_array_equal(ours.processor(images=[image] * 3)["pixel_values"], expected["pixel_values"])


@pytest.fixture(scope="module", autouse=True)
def error_table():
    """With -s: the largest relative error per output and dtype, the figures the bars are about."""
    yield
    if LARGEST_ERRORS:
        print("\nlargest relative error vs transformers:")
        for (output, dtype), error in sorted(LARGEST_ERRORS.items()):
            print(f"  {output:>40} {dtype:>9}: {error:.1e}")

