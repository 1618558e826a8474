"""Image files and prompts in, text out, against transformers' processor + model on the same folder.

A tiny random checkpoint with a tokenizer and processor files: `Blip2Processor` and
`Blip2ForConditionalGeneration` on one side, `miniblip2.load` on the other, same image files,
same prompts. Token ids must be identical; texts are the same ids decoded by both tokenizers.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import miniblip2
from miniblip2 import cli
from miniblip2.shapes import shipped

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example.png"
PROMPTS = ["Question: what is in the picture? Answer:", "a photo of", "Question: how many dogs are there? Answer:"]


@pytest.fixture(scope="module")
def folder(talking_checkpoint):
    return talking_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three image files of different sizes and modes: the processor resizes them all."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (size, mode) in enumerate([((64, 48), "RGB"), ((30, 30), "RGBA"), ((17, 90), "L")]):
        pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
        paths.append(folder / f"image{i}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def models(folder):
    reference = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    processor = Blip2Processor.from_pretrained(folder, backend="pil")  # PIL resizing, as miniblip2 (not torchvision)
    processor.tokenizer.padding_side = "left"  # generation with a batch of prompts needs left padding
    return miniblip2.load(folder), reference.eval(), processor


def reference_generate(models, images, prompts, max_new_tokens=30):
    _, reference, processor = models
    inputs = processor(images=[Image.open(p) for p in images], text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return ids.numpy(), inputs


def test_processor_and_generate_match_transformers(models, images):
    ours = models[0]
    expected, inputs = reference_generate(models, images, PROMPTS)
    got_inputs = ours.processor(images=images, text=PROMPTS)
    np.testing.assert_array_equal(got_inputs["input_ids"], inputs["input_ids"].numpy())
    np.testing.assert_allclose(got_inputs["pixel_values"], inputs["pixel_values"].numpy(), atol=1e-6)
    got = ours.generate(got_inputs["pixel_values"], got_inputs["input_ids"], got_inputs["attention_mask"],
                        max_new_tokens=30)
    np.testing.assert_array_equal(got, expected)
    assert ours.batch_decode(got) == models[2].batch_decode(torch.from_numpy(expected), skip_special_tokens=True)


def test_caption_returns_the_continuation_of_each_prompt(models, images):
    ours, _, processor = models
    expected, inputs = reference_generate(models, images, PROMPTS, max_new_tokens=12)
    new_ids = torch.from_numpy(expected[:, inputs["input_ids"].shape[1]:])
    expected_texts = [t.strip() for t in processor.batch_decode(new_ids, skip_special_tokens=True)]
    assert ours.caption(images, prompt=PROMPTS, max_new_tokens=12) == expected_texts
    assert ours.caption(images[0], prompt=PROMPTS[0], max_new_tokens=12) == expected_texts[0]


def test_caption_without_prompt_matches_transformers(models, images):
    ours, reference, processor = models
    inputs = processor(images=[Image.open(p) for p in images], return_tensors="pt")
    with torch.no_grad():
        ids = reference.generate(**inputs, max_new_tokens=15)
    expected = [t.strip() for t in processor.batch_decode(ids[:, ours.config.num_query_tokens + 1:],
                                                          skip_special_tokens=True)]
    assert ours.caption(images, max_new_tokens=15) == expected


def test_module_caption_and_cli_agree(folder, images, capsys):
    expected = miniblip2.load(folder).caption(images[0], max_new_tokens=8)
    assert miniblip2.caption(images[0], weights=folder, max_new_tokens=8) == expected
    assert cli.main(["caption", str(images[0]), "--weights", str(folder), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_cli_passes_generation_flags(folder, images, capsys):
    expected = miniblip2.load(folder).caption(images[1], max_new_tokens=6, num_beams=3, repetition_penalty=1.3)
    argv = ["caption", str(images[1]), "--weights", str(folder), "--max-new-tokens", "6", "--num-beams", "3",
            "--repetition-penalty", "1.3"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"
    sampled = miniblip2.load(folder).caption(images[1], max_new_tokens=6, do_sample=True, top_p=0.9, seed=4)
    on_test_device = ["--device", TEST_DEVICE]  # a seed draws other numbers on the GPU than on the CPU
    assert cli.main(argv[:6] + ["--do-sample", "--top-p", "0.9", "--seed", "4"] + on_test_device) == 0
    assert capsys.readouterr().out == sampled + "\n"


def test_cli_device_and_dtype_flags(folder, images, capsys):
    expected = miniblip2.load(folder, dtype="float16").caption(images[0], max_new_tokens=6)
    assert cli.main(["caption", str(images[0]), "--weights", str(folder), "--max-new-tokens", "6",
                     "--dtype", "float16"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert cli.main(["caption", str(images[0]), "--weights", str(folder), "--device", "cuda"]) == 2
        assert "pip install 'miniblip2[gpu]'" in capsys.readouterr().err


def test_cli_explains_a_missing_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(shipped, "SHAPES_TINY", tmp_path / "not-shipped")
    assert cli.main(["caption", "x.png"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert cli.main(["caption", "x.png", "--weights", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_load_processor_needs_no_weights(folder, tmp_path, images):
    for name in ["config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"]:
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    processor = miniblip2.load_processor(tmp_path)
    expected = miniblip2.load(folder).processor(images=images, text=PROMPTS)
    got = processor(images=images, text=PROMPTS)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_random_checkpoint_loads_in_transformers_and_agrees(tmp_path):
    """The writer behind the README's first command makes a checkpoint transformers reads too."""
    from miniblip2.testing.random_checkpoint import write_random_checkpoint
    folder = write_random_checkpoint(tmp_path / "tiny", seed=3)
    ours = miniblip2.load(folder)
    reference = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    pixels = ours.processor(images=EXAMPLE)["pixel_values"]
    with torch.no_grad():
        expected = reference.generate(pixel_values=torch.from_numpy(pixels), max_new_tokens=7)
    np.testing.assert_array_equal(ours.generate(pixels, max_new_tokens=7), expected.numpy())
