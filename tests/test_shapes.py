"""The shapes world and the model trained on it, shipped in weights/shapes-tiny.

The accuracy thresholds are the issue's: exact-match captions >= 95% and answers >= 90% on
held-out scenes (50 here; the README gives the 500-scene figures from scripts/eval_shapes.py).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import miniblip2
from miniblip2 import cli, shapes
from miniblip2.blip2 import read_config
from miniblip2.checkpoint.tokenizer import load_tokenizer
from miniblip2.shapes import shipped

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from eval_shapes import TransformersModel  # noqa: E402

SHIPPED = shipped.SHAPES_TINY
HELD_OUT = range(shapes.HELD_OUT_SEEDS.start, shapes.HELD_OUT_SEEDS.start + 50)
needs_model = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="weights/shapes-tiny is missing")


# --- the world ----------------------------------------------------------------------------

def test_a_seed_is_a_scene():
    first, again, other = shapes.sample(123), shapes.sample(123), shapes.sample(124)
    assert first[0].tobytes() == again[0].tobytes() and first[1:] == again[1:]
    assert first[0].tobytes() != other[0].tobytes()
    assert first[0].size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and first[0].mode == "RGB"


def test_objects_are_those_of_the_scene_sample_draws():
    assert all(shapes.caption(shapes.objects(seed)) == shapes.sample(seed)[1] for seed in range(100))


def test_captions_follow_the_grammar():
    seen = set()
    for seed in range(300):
        objects = shapes.objects(seed)
        text = shapes.caption(objects)
        assert all(o.words in text for o in objects)
        assert [text.index(o.words) for o in objects] == sorted(text.index(o.words) for o in objects)
        assert len({o.shape for o in objects}) == len(objects)  # a question names one object
        if len(objects) == 2:
            seen.add("above" if " above " in text else "left")
            assert (" above " in text) == (objects[0].row < objects[1].row)
        seen.add(len(objects))
    assert seen == {1, 2, 3, "above", "left"}


def test_questions_have_the_true_answers():
    for seed in range(100):
        image, caption, qa_pairs = shapes.sample(seed)
        answers = dict(qa_pairs)
        count = shapes.NUMBERS.index(answers["Question: how many shapes are there? Answer:"]) + 1
        assert caption.count(" a ") + caption.startswith("a ") == count
        for shape in shapes.SHAPES:
            if f"Question: what color is the {shape}? Answer:" in answers:
                color = answers[f"Question: what color is the {shape}? Answer:"]
                size = answers[f"Question: what size is the {shape}? Answer:"]
                assert f"{size} {color} {shape}" in caption
        assert sorted(a for q, a in qa_pairs if q.startswith("Question: is there")) == ["no", "yes"]


def test_each_object_is_drawn_in_its_cell_in_its_colour():
    """The picture matches the words: in the object's cell, enough pixels are close to its colour
    (within the colour jitter plus the anti-aliasing margin), and the smallest object covers
    at least 8x8 px, so a count well above 20 pixels cannot come from the background."""
    for seed in range(60):
        objects = shapes.objects(seed)
        image = np.asarray(shapes.sample(seed)[0]).astype(int)
        cell = shapes.IMAGE_SIZE // shapes.GRID
        for o in objects:
            patch = image[o.row * cell:(o.row + 1) * cell + 1, o.column * cell:(o.column + 1) * cell + 1]
            near = np.abs(patch - np.array(shapes.COLORS[o.color])).max(axis=-1) <= shapes.COLOR_JITTER + 2
            assert near.sum() >= 20, (seed, o)


# --- the shipped files --------------------------------------------------------------------

@needs_model
def test_shipped_folder_has_the_hub_layout_and_fits_in_20_mb():
    names = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
            "merges.txt"} <= names
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 20 * 2**20
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]


@needs_model
def test_shipped_tokenizer_follows_the_opt_conventions():
    tokenizer, config = load_tokenizer(SHIPPED), read_config(SHIPPED)
    ids = tokenizer.encode("a red circle")
    assert ids[0] == tokenizer.bos_token_id == 2 and tokenizer.pad_token_id == 1
    assert tokenizer.image_token_id == config.image_token_index == tokenizer.vocab_size - 1
    assert tokenizer.decode([config.text.eos_token_id]) == "\n"
    assert tokenizer.decode(tokenizer.encode("naïve café ✓")) == "naïve café ✓"  # byte level: any text
    assert len(ids) == 4  # every word of the world is one token


@pytest.fixture(scope="module")
def model():
    return miniblip2.load(SHIPPED, progress=False)


@pytest.fixture(scope="module")
def evaluation(model):
    return shapes.evaluate(model, HELD_OUT)


@needs_model
def test_caption_accuracy_on_50_held_out_scenes(evaluation):
    assert evaluation.caption_accuracy >= 0.95, evaluation.caption_accuracy


# The shipped model answers 99.4% of the questions on 500 held-out scenes, 99.8% (446 of 447) on
# these 50; 90% is what issue 5 asks.
@needs_model
def test_answer_accuracy_on_50_held_out_scenes(evaluation):
    assert evaluation.vqa_accuracy >= 0.90, evaluation.vqa_accuracy


@needs_model
def test_transformers_agrees_on_every_scene(model, evaluation):
    """The same weights in transformers' Blip2ForConditionalGeneration, fed the same arrays,
    generate the same text for every caption and every answer."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    theirs = shapes.evaluate(TransformersModel.load(SHIPPED, model.processor), HELD_OUT)
    assert theirs.captions == evaluation.captions
    assert theirs.answers == evaluation.answers


# --- the shipped model is the default -----------------------------------------------------

@needs_model
def test_caption_without_weights_uses_the_shipped_model_and_says_so_once(monkeypatch, capsys):
    monkeypatch.delenv(shipped.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(shipped, "_announced", False)
    image, truth, _ = shapes.sample(HELD_OUT[0])
    first, second = miniblip2.caption(image), miniblip2.caption(image, prompt="Question: how many shapes are there? Answer:")
    assert first == miniblip2.load(SHIPPED, progress=False).caption(image)
    assert second in shapes.NUMBERS
    assert capsys.readouterr().err.count("using the small shapes model") == 1


def test_environment_variable_names_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv(shipped.WEIGHTS_ENV, str(tmp_path))
    assert shipped.weights_folder() == tmp_path
    assert shipped.weights_folder("elsewhere") == Path("elsewhere")


@needs_model
def test_cli_caption_and_demo_use_the_shipped_model(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(shipped.WEIGHTS_ENV, raising=False)
    seed = HELD_OUT[1]
    image, truth, qa_pairs = shapes.sample(seed)
    image.save(tmp_path / "scene.png")
    assert cli.main(["caption", str(tmp_path / "scene.png")]) == 0
    assert capsys.readouterr().out.strip() == miniblip2.load(SHIPPED, progress=False).caption(image)
    assert cli.main(["demo", "--seed", str(seed), "--out", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    assert f"true caption:  {truth}\n" in out and out.count("\n") == 3 + len(qa_pairs)
    assert (tmp_path / "demo.png").is_file()


def test_demo_reports_an_unwritable_picture(tmp_path, capsys):
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("weights/shapes-tiny is missing")
    assert cli.main(["demo", "--seed", "1", "--out", str(tmp_path / "no" / "such" / "dir.png")]) == 2
    assert "give another --out FILE" in capsys.readouterr().err


def test_missing_default_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv(shipped.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(shipped, "SHAPES_TINY", tmp_path / "gone")
    with pytest.raises(miniblip2.CheckpointError, match="set MINIBLIP2_WEIGHTS"):
        shipped.weights_folder()
    assert os.environ.get(shipped.WEIGHTS_ENV) is None
