"""Shared fixtures: tiny random BLIP-2 checkpoints written to disk the way the hub has them.

MINIBLIP2_TEST_DEVICE=cuda runs the whole suite with every model loaded on the GPU (CuPy):
`miniblip2.load` then defaults to device="cuda", so forward, generate, caption and the CLI run
on CuPy arrays against the same references; tests that pass device="cpu" stay on the CPU.
"""

import os
from pathlib import Path

import pytest
import torch
from tiny import VOCAB_SIZE, tiny_config, tiny_model, tiny_t5_config

import miniblip2
from miniblip2 import cli, families
from miniblip2.testing.tiny_tokenizer import build_tiny_processor_files, build_tiny_tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

# Odd widths and head counts everywhere, cross-attention in every layer or every other one,
# and an image whose patch grid is not the trained one (position interpolation).
CONFIGS = {
    "every-other-cross": tiny_config(),
    "every-cross": tiny_config(vision=dict(num_attention_heads=5), qformer=dict(cross_attention_frequency=1,
                               num_attention_heads=2), text=dict(hidden_size=33, num_attention_heads=3, ffn_dim=29)),
    "small-patches": tiny_config(vision=dict(image_size=28, patch_size=4, num_hidden_layers=3),
                                 qformer=dict(num_hidden_layers=2), num_query_tokens=3),
}
# BLIP-2 with Flan-T5: gated-GELU with its own lm_head (as Flan-T5), and a plain ReLU T5 with the
# lm_head tied to the embeddings (the d_model ** -0.5 rescale), cross-attention in every layer.
T5_CONFIGS = {
    "gated-untied": tiny_t5_config(),
    "relu-tied": tiny_t5_config(qformer=dict(cross_attention_frequency=1),
                                text=dict(feed_forward_proj="relu", tie_word_embeddings=True, d_kv=9, num_heads=3)),
}
# (layout, dtype on disk): one file or several shards, fp32 / fp16 / bf16.
LAYOUTS = [("single", torch.float32), ("sharded", torch.float32), ("single", torch.float16),
           ("sharded", torch.bfloat16)]


def save_checkpoint(model, folder, layout="single", dtype=torch.float32):
    """save_pretrained in the hub layout; 'sharded' forces several model-0000N-of-0000M files."""
    shard_size = "20KB" if layout == "sharded" else "10GB"
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    files = sorted(p.name for p in Path(folder).glob("*.safetensors"))
    assert (len(files) > 1) == (layout == "sharded"), files
    return folder


def checkpoint_maker(tmp_path_factory, configs, prefix):
    """make(config_name, layout, dtype) -> the folder of tiny_model(configs[name]) saved that way,
    written once per session."""
    made = {}

    def make(name=next(iter(configs)), layout="single", dtype=torch.float32):
        key = (name, layout, dtype)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{prefix}{name}-{layout}-{str(dtype)[6:]}")
            made[key] = save_checkpoint(tiny_model(configs[name]), folder, layout, dtype)
        return made[key]

    return make


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(config_name, layout, dtype) -> folder of a tiny BLIP-2 OPT, once per session."""
    return checkpoint_maker(tmp_path_factory, CONFIGS, "")


@pytest.fixture(scope="session")
def t5_checkpoint(tmp_path_factory):
    """t5_checkpoint(config_name, layout, dtype) -> folder of a tiny BLIP-2 Flan-T5, once per session."""
    return checkpoint_maker(tmp_path_factory, T5_CONFIGS, "t5-")


@pytest.fixture(scope="session")
def talking_checkpoint(tmp_path_factory):
    """A tiny checkpoint with tokenizer and processor files, so that caption/stream take images."""
    folder = tmp_path_factory.mktemp("tiny-with-tokenizer")
    config = CONFIGS["every-other-cross"]
    save_checkpoint(tiny_model(config), folder)
    build_tiny_tokenizer(folder, VOCAB_SIZE)
    build_tiny_processor_files(folder, config.vision_config.image_size, config.num_query_tokens)
    return folder


TEST_DEVICE = os.environ.get("MINIBLIP2_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session", autouse=True)
def default_device():
    """Make `miniblip2.load` load on MINIBLIP2_TEST_DEVICE unless a test names a device."""
    if TEST_DEVICE == "cpu":
        yield TEST_DEVICE
        return
    from miniblip2.runtime.device import array_module
    array_module(TEST_DEVICE)  # a missing CuPy or GPU stops the run here, with the reason
    load = families.load

    def load_on_test_device(path, dtype="float32", progress=True, device=TEST_DEVICE):
        return load(path, dtype, progress, device)

    with pytest.MonkeyPatch.context() as patch:
        for module in (miniblip2, families, cli):
            patch.setattr(module, "load", load_on_test_device)
        yield TEST_DEVICE


def pytest_report_header(config):
    return f"miniblip2 test device: {TEST_DEVICE} (set MINIBLIP2_TEST_DEVICE=cuda for the GPU)"


def pytest_terminal_summary(terminalreporter):
    """Print the largest relative error per stage, the figure the parity bar is about."""
    from test_blip import LARGEST_BLIP_ERRORS
    from test_flan_t5 import LARGEST_T5_ERRORS
    from test_parity import LARGEST_ERRORS
    for family, errors in [("BLIP-2 OPT", LARGEST_ERRORS), ("BLIP-2 Flan-T5", LARGEST_T5_ERRORS),
                           ("BLIP", LARGEST_BLIP_ERRORS)]:
        if errors:
            terminalreporter.section(f"{family}: largest relative error vs transformers (fp32)")
            for stage, error in errors.items():
                terminalreporter.write_line(f"{stage:>12}: {error:.2e}")
