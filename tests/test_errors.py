"""Bad input through the public API: one clear miniblip2 error that says what to do, never a
traceback from inside NumPy. (File-level safetensors errors: test_weights.py; image files and
modes: test_image.py; tokenizer and processor files: test_tokenizer.py, test_processor.py.)"""

import json
import shutil
import sys

import numpy as np
import pytest
from tiny import IMAGE_TOKEN

import miniblip2
from miniblip2 import CheckpointError, DeviceError, ImageError, PromptError
from miniblip2.blip2 import config_from_dict
from miniblip2.shapes import shipped


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint()


@pytest.fixture(scope="module")
def model(tiny):
    return miniblip2.load(tiny)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def good_inputs(model, batch=1, text_ids=(5, 6)):
    Q = model.config.num_query_tokens
    pixels = np.zeros((batch, 3, model.config.vision.image_size, model.config.vision.image_size), np.float32)
    ids = np.tile([IMAGE_TOKEN] * Q + [2, *text_ids], (batch, 1))
    return pixels, ids


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere does not exist; give the folder of a checkpoint"):
        miniblip2.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file is a file, not a folder"):
        miniblip2.load(tmp_path / "file")
    with pytest.raises(CheckpointError, match="config.json"):
        miniblip2.load(tmp_path)


def test_config_that_is_not_json(tiny, tmp_path):
    folder = copy_checkpoint(tiny, tmp_path / "ckpt")
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="could not be read as JSON"):
        miniblip2.load(folder)


def test_unknown_language_model_is_refused_naming_what_is_supported():
    with pytest.raises(CheckpointError, match="'llama'.*'opt'.*'t5'"):
        config_from_dict({"model_type": "blip-2", "image_token_index": 32100, "text_config": {"model_type": "llama"}})


def test_unknown_architecture_is_refused_naming_what_is_supported(tiny, tmp_path):
    folder = copy_checkpoint(tiny, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Blip2ForSomethingElse"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'Blip2ForSomethingElse'.*supported: Blip2ForConditionalGeneration"):
        miniblip2.load(folder)


def test_not_a_blip2_config():
    with pytest.raises(CheckpointError, match="model_type 'blip-2'"):
        config_from_dict({"model_type": "blip"})


def test_unsupported_activation_is_named():
    with pytest.raises(CheckpointError, match="swish"):
        config_from_dict({"model_type": "blip-2", "image_token_index": 5, "vision_config": {"hidden_act": "swish"}})


def test_config_that_does_not_fit_the_weights(tiny, tmp_path):
    folder = copy_checkpoint(tiny, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["qformer_config"]["intermediate_size"] = 64  # the file's FFN is 50 wide
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"intermediate_query.dense.weight: expected \(64, 24\), found \(50, 24\)"):
        miniblip2.load(folder)


def test_missing_shard(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint(layout="sharded"), tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        miniblip2.load(folder)


def test_truncated_weights(tiny, tmp_path):
    folder = copy_checkpoint(tiny, tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        miniblip2.load(folder)


def test_unsupported_compute_dtype(tiny):
    with pytest.raises(DeviceError, match="float64.*float32, float16, bfloat16"):
        miniblip2.load(tiny, dtype="float64")


def test_unknown_device(tiny):
    with pytest.raises(DeviceError, match="'tpu'.*'cpu', 'cuda'"):
        miniblip2.load(tiny, device="tpu")


def test_cuda_without_cupy_says_what_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed: import fails
    with pytest.raises(DeviceError, match=r"needs CuPy.*pip install 'miniblip2\[gpu\]'.*cupy-cuda12x.*CUDA 12"):
        miniblip2.load(tiny, device="cuda", dtype="float16")


def test_pixel_values_of_the_wrong_shape(model):
    pixels, ids = good_inputs(model)
    for bad in [pixels[0], pixels[:, :1], [[1, 2, 3]]]:
        with pytest.raises(ImageError, match=r"\[batch, 3, height, width\]"):
            model.generate(bad, ids)


def test_image_of_another_size_needs_interpolation(model):
    pixels, ids = good_inputs(model)
    with pytest.raises(ImageError, match="interpolate_pos_encoding=True"):
        model.forward(np.zeros((1, 3, 60, 60), np.float32), ids)


def test_prompt_without_the_image_tokens(model):
    pixels, _ = good_inputs(model)
    with pytest.raises(PromptError, match=r"exactly 5 <image> tokens"):
        model.generate(pixels, np.array([[2, 5, 6]]))


def test_ids_outside_the_vocabulary(model):
    pixels, ids = good_inputs(model, text_ids=(5, 10_000))
    with pytest.raises(PromptError, match="must lie in"):
        model.forward(pixels, ids)


def test_prompt_count_differs_from_image_count(model):
    pixels, ids = good_inputs(model, batch=2)
    with pytest.raises(PromptError, match="one prompt per image"):
        model.generate(pixels, ids[:1])


def test_mask_shape_differs_from_ids(model):
    pixels, ids = good_inputs(model)
    with pytest.raises(PromptError, match="attention_mask"):
        model.generate(pixels, ids, np.ones((1, 3), np.int64))


def test_float_ids_are_refused(model):
    pixels, ids = good_inputs(model)
    with pytest.raises(PromptError, match="integer"):
        model.generate(pixels, ids.astype(np.float32))


def test_over_long_prompt(model):
    limit = model.config.text.max_position_embeddings  # 96 in the tiny model
    pixels, ids = good_inputs(model, text_ids=[5] * (limit - 10))
    with pytest.raises(PromptError, match="Shorten the prompt"):
        model.generate(pixels, ids, max_new_tokens=20)
    with pytest.raises(PromptError, match="more than the model's 96 positions"):
        model.forward(*good_inputs(model, text_ids=[5] * limit))


def test_padding_does_not_count_against_the_position_table(model):
    """Positions count real tokens: a prompt padded far past the table still fits if its text does."""
    limit = model.config.text.max_position_embeddings
    pixels, ids = good_inputs(model, text_ids=[5] * 10)
    padding = limit - ids.shape[1] - 5  # padded width + 20 new tokens > limit; real tokens + 20 < limit
    padded = np.concatenate([np.ones((1, padding), ids.dtype), ids], axis=1)
    mask = (np.arange(padded.shape[1]) >= padding).astype(np.int64)[None]
    new = model.generate(pixels, padded, mask, max_new_tokens=20)[:, padded.shape[1]:]
    np.testing.assert_array_equal(new, model.generate(pixels, ids, max_new_tokens=20)[:, ids.shape[1]:])


def test_caption_without_processor_files(tiny):
    with pytest.raises(CheckpointError, match="tokenizer"):
        miniblip2.load(tiny).caption("docs/example.png")


def test_module_caption_needs_weights(monkeypatch, tmp_path):
    """Without weights=, $MINIBLIP2_WEIGHTS or the shipped model, the error says what to give."""
    monkeypatch.delenv(shipped.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(shipped, "SHAPES_TINY", tmp_path / "not-shipped")
    with pytest.raises(CheckpointError, match="weights="):
        miniblip2.caption("docs/example.png")
