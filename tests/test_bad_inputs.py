"""Bad and odd input through load, caption, generate, the processor and the CLI (issue #17).

Every case is a mistake a new user makes, or a file that is broken in a way a download or an
edit can break it. Each must raise one miniblip2 error whose message names the culprit (the file
and key, the argument, the tensor) with the value found, and nothing may come back silently
wrong. One table per kind of input; each case asserts the error class and a fragment of the
message naming the culprit. `test_cli_reports_in_one_line` then runs every case a command line
can express through `cli.main`: exit code 2, one line on stderr, no traceback.

The checkpoints are the tiny ones of conftest.py with their tokenizer and processor files:
BLIP-2 OPT (`talking_checkpoint`), BLIP-2 Flan-T5 (built here as test_flan_t5.py builds it) and
Blip2ForImageTextRetrieval (as test_retrieval.py builds it). Each file case edits a copy.
"""

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import pytest
import torch
from tiny import T5_VOCAB_SIZE, tiny_model, tiny_t5_config

import miniblip2
from miniblip2 import cli
from miniblip2.checkpoint.safetensors import is_bf16, read_safetensors, save_safetensors
from miniblip2.errors import CheckpointError, DeviceError, ImageError, MiniBlip2Error, NonFiniteError, PromptError
from miniblip2.generation.streaming import TextStreamer

NAN, INF = math.nan, math.inf
DELETE = object()  # as an edit: remove the file


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable  # run(ctx): the bad call, which must raise `error`
    error: type
    culprit: str  # a regex the message must match: the file and key, argument or tensor at fault
    argv: Callable | None = None  # argv(ctx): the same mistake on the command line, where it can be made


# --- the checkpoints and what the cases share -------------------------------------------------

@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """Hub ids resolve from an empty cache, offline: these tests never wait on a network."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def t5_talker(tmp_path_factory):
    from conftest import save_checkpoint

    from miniblip2.testing.tiny_tokenizer import build_tiny_processor_files, build_tiny_t5_tokenizer
    folder = tmp_path_factory.mktemp("t5-talker")
    config = tiny_t5_config()
    save_checkpoint(tiny_model(config, seed=3), folder)
    build_tiny_t5_tokenizer(folder, T5_VOCAB_SIZE)
    build_tiny_processor_files(folder, config.vision_config.image_size, config.num_query_tokens)
    return folder


@pytest.fixture(scope="module")
def itm(tmp_path_factory):
    from test_retrieval import MODELS, randomised, write_processor_files
    folder = tmp_path_factory.mktemp("itm")
    cls, config = MODELS["itm"]
    randomised(cls(config)).save_pretrained(folder)
    write_processor_files(folder, with_placeholders=False)
    return folder


class Context:
    """The base checkpoints, a picture file, loaded models and edited copies, for the cases."""

    def __init__(self, bases, tmp):
        self.bases, self.tmp, self._models, self._folders = bases, tmp, {}, {}
        self.image = tmp / "picture.png"
        rng = np.random.default_rng(0)
        PIL.Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(self.image)

    def model(self, base="opt", **kwargs):
        key = (base, tuple(sorted(kwargs.items())))
        if key not in self._models:
            self._models[key] = miniblip2.load(self.folder(base), progress=False, **kwargs)
        return self._models[key]

    def folder(self, base, edits=None, key=None):
        """The base checkpoint, or (with `edits`) a copy with them applied, made once per `key`."""
        if not edits:
            return self.bases[base]
        if key not in self._folders:
            folder = self.tmp / f"case-{len(self._folders)}"
            shutil.copytree(self.bases[base], folder)
            for name, edit in edits.items():
                apply_edit(folder / name, edit)
            self._folders[key] = folder
        return self._folders[key]

    def pixels(self, base="opt", batch=1, size=None, fill=0.0):
        size = size or self.model(base).config.vision.image_size
        return np.full((batch, 3, size, size), fill, dtype=np.float32)

    def prompt(self, base="opt", batch=1):
        """input_ids and attention_mask for `batch` images, as the processor makes them."""
        inputs = self.model(base).processor(images=[str(self.image)] * batch, text=["a question"] * batch)
        return inputs["input_ids"], inputs["attention_mask"]


def apply_edit(path, edit):
    """DELETE; raw text or bytes for the whole file; a callable on the path; or {"a.b": value}
    setting nested JSON keys (DELETE removes one)."""
    if edit is DELETE:
        path.unlink()
    elif isinstance(edit, str):
        path.write_text(edit)
    elif isinstance(edit, bytes):
        path.write_bytes(edit)
    elif callable(edit):
        edit(path)
    else:
        data = json.loads(path.read_text())
        for key, value in edit.items():
            *parents, last = key.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            if value is DELETE:
                node.pop(last, None)
            else:
                node[last] = value
        path.write_text(json.dumps(data))  # NaN and inf become NaN and Infinity, as Python's json reads them


@pytest.fixture(scope="module")
def ctx(talking_checkpoint, t5_talker, itm, checkpoint, tmp_path_factory):
    bases = {"opt": talking_checkpoint, "t5": t5_talker, "itm": itm,
             "opt-bf16": checkpoint(dtype=torch.bfloat16), "opt-fp16": checkpoint(dtype=torch.float16),
             "opt-sharded": checkpoint(layout="sharded")}
    return Context(bases, tmp_path_factory.mktemp("bad-inputs"))


def caption_argv(base):  # the command that loads `folder` and uses it: caption, or match for retrieval
    def argv(ctx, folder):
        if base == "itm":
            return ["match", str(ctx.image), "a red circle", "--weights", str(folder)]
        return ["caption", str(ctx.image), "--weights", str(folder), "--max-new-tokens", "3"]
    return argv


def file_case(id, base, edits, culprit, error=CheckpointError):
    """A checkpoint folder with `edits`: refused by `load`, and by the CLI that loads it."""
    return Case(id, lambda ctx: miniblip2.load(ctx.folder(base, edits, id), progress=False), error, culprit,
                lambda ctx: caption_argv(base)(ctx, ctx.folder(base, edits, id)))


def config_case(id, changes, culprit, base="opt"):
    return file_case(id, base, {"config.json": changes}, culprit)


def check(ctx, case):
    with pytest.raises(case.error) as caught:
        case.run(ctx)
    assert isinstance(caught.value, MiniBlip2Error)
    assert re.search(case.culprit, str(caught.value)), f"{case.id}: {caught.value}"


def ids(cases):
    return [case.id for case in cases]


# --- config.json: sections, types and ranges of every field ------------------------------------

V, QF, T = "vision_config", "qformer_config", "text_config"
DEEP = "[" * 100_000 + "]" * 100_000

CONFIG_CASES = [
    config_case("vision-section-string", {V: "big"}, "config.json: vision_config should be a JSON object, not str"),
    config_case("vision-section-list", {V: [1, 2]}, "vision_config should be a JSON object, not list"),
    config_case("vision-section-empty-list", {V: []}, "vision_config should be a JSON object, not list"),
    config_case("qformer-section-string", {QF: "x"}, "qformer_config should be a JSON object"),
    config_case("text-section-list", {T: []}, "text_config should be a JSON object, not list"),
    config_case("text-section-string", {T: "opt"}, "text_config should be a JSON object, not str"),
    config_case("t5-text-section-number", {T: 5}, "text_config should be a JSON object, not int", "t5"),
    config_case("hidden-size-string", {f"{V}.hidden_size": "40"}, r"vision_config.hidden_size = '40' \(str\): "
                                                                  "expected an integer >= 1"),
    config_case("hidden-size-float", {f"{V}.hidden_size": 40.0}, r"vision_config.hidden_size = 40.0 \(float\)"),
    config_case("ffn-size-string", {f"{T}.ffn_dim": "44"}, "text_config.ffn_dim = '44'"),
    config_case("vision-heads-zero", {f"{V}.num_attention_heads": 0}, "vision_config.num_attention_heads = 0"),
    config_case("vision-heads-negative", {f"{V}.num_attention_heads": -4}, "vision_config.num_attention_heads = -4"),
    config_case("qformer-heads-zero", {f"{QF}.num_attention_heads": 0}, "qformer_config.num_attention_heads = 0"),
    config_case("opt-heads-zero", {f"{T}.num_attention_heads": 0}, "text_config.num_attention_heads = 0"),
    config_case("t5-heads-negative", {f"{T}.num_heads": -5}, "text_config.num_heads = -5", "t5"),
    config_case("heads-do-not-divide", {f"{V}.hidden_size": 41}, "vision_config: hidden_size 41 is not a multiple "
                                                                 "of num_attention_heads 4"),
    config_case("patch-zero", {f"{V}.patch_size": 0}, "vision_config.patch_size = 0"),
    config_case("patch-negative", {f"{V}.patch_size": -6}, "vision_config.patch_size = -6"),
    config_case("patch-string", {f"{V}.patch_size": "6"}, "vision_config.patch_size = '6'"),
    config_case("patch-larger-than-image", {f"{V}.patch_size": 31}, "vision_config.patch_size = 31 is larger than "
                                                                    "vision_config.image_size = 30"),
    config_case("image-size-float", {f"{V}.image_size": 30.5}, "vision_config.image_size = 30.5"),
    config_case("image-size-not-square", {f"{V}.image_size": [30, 24]}, r"vision_config.image_size = \[30, 24\]: "
                                                                        "only square sizes"),
    config_case("cross-frequency-zero", {f"{QF}.cross_attention_frequency": 0},
                "qformer_config.cross_attention_frequency = 0"),
    config_case("cross-frequency-negative", {f"{QF}.cross_attention_frequency": -2},
                "qformer_config.cross_attention_frequency = -2"),
    config_case("cross-frequency-float", {f"{QF}.cross_attention_frequency": 1.5},
                "qformer_config.cross_attention_frequency = 1.5"),
    config_case("eps-string", {f"{V}.layer_norm_eps": "1e-6"}, "vision_config.layer_norm_eps = '1e-6'"),
    config_case("eps-zero", {f"{QF}.layer_norm_eps": 0}, r"qformer_config.layer_norm_eps = 0 \(int\): expected a "
                                                         "finite number > 0"),
    config_case("eps-negative", {f"{V}.layer_norm_eps": -1e-6}, "vision_config.layer_norm_eps = -1e-06"),
    config_case("eps-nan", {f"{T}.layer_norm_eps": NAN}, "text_config.layer_norm_eps = nan"),
    config_case("t5-eps-inf", {f"{T}.layer_norm_epsilon": INF}, "text_config.layer_norm_epsilon = inf", "t5"),
    config_case("vocab-string", {f"{T}.vocab_size": "320"}, "text_config.vocab_size = '320'"),
    config_case("vocab-zero", {f"{T}.vocab_size": 0}, "text_config.vocab_size = 0"),
    config_case("positions-zero", {f"{T}.max_position_embeddings": 0}, "text_config.max_position_embeddings = 0"),
    config_case("layers-negative", {f"{V}.num_hidden_layers": -1}, "vision_config.num_hidden_layers = -1"),
    config_case("eos-string", {f"{T}.eos_token_id": "10"}, "text_config.eos_token_id = '10'"),
    config_case("eos-empty-list", {f"{T}.eos_token_id": []}, r"text_config.eos_token_id = \(\)"),
    config_case("eos-list-with-negative", {f"{T}.eos_token_id": [10, -1]}, r"text_config.eos_token_id = \(10, -1\)"),
    config_case("eos-past-vocab", {f"{T}.eos_token_id": 500}, "text_config.eos_token_id = 500 is not below "
                                                              "text_config.vocab_size = 320"),
    config_case("pad-negative", {f"{T}.pad_token_id": -1}, "text_config.pad_token_id = -1"),
    config_case("bos-float", {f"{T}.bos_token_id": 2.0}, "text_config.bos_token_id = 2.0"),
    config_case("t5-start-past-vocab", {f"{T}.decoder_start_token_id": 999},
                "text_config.decoder_start_token_id = 999 is not below", "t5"),
    config_case("query-tokens-string", {"num_query_tokens": "5"}, "config.json: num_query_tokens = '5'"),
    config_case("query-tokens-zero", {"num_query_tokens": 0}, "config.json: num_query_tokens = 0"),
    config_case("image-token-string", {"image_token_index": "319"}, "config.json: image_token_index = '319'"),
    config_case("image-token-past-vocab", {"image_token_index": 400}, "image_token_index = 400 is not below "
                                                                      "text_config.vocab_size = 320"),
    config_case("hidden-act-list", {f"{V}.hidden_act": ["gelu"]}, r"vision_config.hidden_act = \['gelu'\]"),
    config_case("hidden-act-number", {f"{QF}.hidden_act": 5}, "qformer_config.hidden_act = 5"),
    config_case("activation-unknown", {f"{T}.activation_function": "swish"},
                "text_config.activation_function = 'swish' is not supported"),
    config_case("qkv-bias-string", {f"{V}.qkv_bias": "true"}, r"vision_config.qkv_bias = 'true' \(str\): expected "
                                                              "true or false"),
    config_case("layer-norm-before-int", {f"{T}.do_layer_norm_before": 1}, "text_config.do_layer_norm_before = 1"),
    config_case("channels-four", {f"{V}.num_channels": 4}, "vision_config.num_channels = 4"),
    config_case("t5-buckets-one", {f"{T}.relative_attention_num_buckets": 1},
                "text_config.relative_attention_num_buckets = 1", "t5"),
    config_case("t5-distance-too-small", {f"{T}.relative_attention_max_distance": 2},
                "relative_attention_max_distance = 2", "t5"),
    config_case("t5-d-kv-zero", {f"{T}.d_kv": 0}, "text_config.d_kv = 0", "t5"),
    config_case("t5-ffn-proj-number", {f"{T}.feed_forward_proj": 5}, "text_config.feed_forward_proj = 5", "t5"),
    config_case("t5-tie-string", {f"{T}.tie_word_embeddings": "no"}, "text_config.tie_word_embeddings = 'no'", "t5"),
    config_case("itm-query-tokens-float", {"num_query_tokens": 5.0}, "config.json: num_query_tokens = 5.0", "itm"),
    config_case("itm-projection-zero", {"image_text_hidden_size": 0}, "config.json: image_text_hidden_size = 0",
                "itm"),
    config_case("itm-qformer-vocab-string", {f"{QF}.vocab_size": "97"}, "qformer_config.vocab_size = '97'", "itm"),
    config_case("itm-positions-negative", {f"{QF}.max_position_embeddings": -1},
                "qformer_config.max_position_embeddings = -1", "itm"),
    config_case("itm-vision-section-list", {V: ["a"]}, "vision_config should be a JSON object", "itm"),
    file_case("config-nested-deep", "opt", {"config.json": DEEP}, "config.json is nested too deeply"),
    file_case("section-nested-deep", "opt", {"config.json": '{"model_type": "blip-2", "vision_config": ' + DEEP + "}"},
              "config.json is nested too deeply"),
    file_case("config-huge-number", "opt", {"config.json": '{"num_query_tokens": ' + "9" * 5000 + "}"},
              "config.json could not be read as JSON"),
    file_case("config-a-list", "opt", {"config.json": "[1, 2]"}, "config.json should hold a JSON object, not list"),
    file_case("config-not-utf8", "opt", {"config.json": b"\xff\xfe{}"}, "config.json could not be read as JSON"),
    file_case("t5-config-truncated", "t5", {"config.json": '{"model_type": "blip-2", "text_con'},
              "config.json could not be read as JSON"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=ids(CONFIG_CASES))
def test_config_files(ctx, case):
    check(ctx, case)


# --- preprocessor_config.json and processor_config.json ----------------------------------------

def preprocessor_case(id, changes, culprit, base="opt"):
    return file_case(id, base, {"preprocessor_config.json": changes}, "preprocessor_config.json: " + culprit)


PROCESSOR_CASES = [
    preprocessor_case("rescale-string", {"rescale_factor": "0.0039"}, r"rescale_factor = '0.0039' \(str\)"),
    preprocessor_case("rescale-zero", {"rescale_factor": 0}, "rescale_factor = 0"),
    preprocessor_case("rescale-negative", {"rescale_factor": -1 / 255}, "rescale_factor = -0.0039"),
    preprocessor_case("rescale-nan", {"rescale_factor": NAN}, "rescale_factor = nan"),
    preprocessor_case("std-zero", {"image_std": 0}, r"image_std = \(0, 0, 0\)"),
    preprocessor_case("std-one-channel-zero", {"image_std": [0.27, 0, 0.28]}, r"image_std = \(0.27, 0, 0.28\)"),
    preprocessor_case("std-two-numbers", {"image_std": [0.2, 0.2]}, r"image_std = \(0.2, 0.2\); RGB needs 3"),
    preprocessor_case("std-string", {"image_std": "0.27"}, "image_std = "),
    preprocessor_case("std-inf", {"image_std": [INF, 0.26, 0.27]}, r"image_std = \(inf"),
    preprocessor_case("mean-string", {"image_mean": ["0.5", 0.5, 0.5]}, r"image_mean = \('0.5'"),
    preprocessor_case("mean-nan", {"image_mean": [NAN, 0.4, 0.4]}, r"image_mean = \(nan"),
    preprocessor_case("do-resize-string", {"do_resize": "yes"}, "do_resize = 'yes'"),
    preprocessor_case("do-normalize-int", {"do_normalize": 1}, "do_normalize = 1"),
    preprocessor_case("resample-name", {"resample": "bicubic"}, "resample = 'bicubic'"),
    preprocessor_case("resample-unknown", {"resample": 9}, "resample=9 is not a PIL resampling filter"),
    file_case("size-zero", "opt", {"preprocessor_config.json": {"size": 0}}, "image processor size 0"),
    file_case("size-string-height", "opt", {"preprocessor_config.json": {"size": {"height": "30", "width": 30}}},
              "image processor size"),
    file_case("size-negative-edge", "opt", {"preprocessor_config.json": {"size": {"shortest_edge": -1}}},
              "image processor size"),
    file_case("preprocessor-a-list", "opt", {"preprocessor_config.json": "[]"},
              "preprocessor_config.json should hold a JSON object"),
    file_case("preprocessor-nested-deep", "opt", {"preprocessor_config.json": DEEP},
              "preprocessor_config.json is nested too deeply"),
    file_case("processor-query-tokens-string", "opt", {"processor_config.json": {"num_query_tokens": "5"}},
              "processor_config.json: num_query_tokens must be a positive int, not '5'"),
    file_case("processor-query-tokens-zero", "opt", {"processor_config.json": {"num_query_tokens": 0}},
              "processor_config.json: num_query_tokens must be a positive int, not 0"),
    preprocessor_case("t5-std-zero", {"image_std": [0.2, 0.2, 0]}, r"image_std = \(0.2, 0.2, 0\)", "t5"),
    preprocessor_case("t5-rescale-string", {"rescale_factor": "1/255"}, "rescale_factor = '1/255'", "t5"),
    preprocessor_case("itm-std-zero", {"image_std": 0.0}, "image_std", "itm"),
    preprocessor_case("itm-do-rescale-string", {"do_rescale": "false"}, "do_rescale = 'false'", "itm"),
]


@pytest.mark.parametrize("case", PROCESSOR_CASES, ids=ids(PROCESSOR_CASES))
def test_processor_files(ctx, case):
    check(ctx, case)


# --- the tokenizer's files: special tokens, added tokens, flags -------------------------------

def tokenizer_case(id, changes, culprit, base="opt", file="tokenizer_config.json"):
    return file_case(id, base, {file: changes}, culprit)


def bpe_case(id, changes, culprit):
    """tokenizer_config.json's added_tokens_decoder is read where the folder has the classic
    vocab.json + merges.txt and no tokenizer.json."""
    return file_case(id, "opt", {"tokenizer.json": DELETE, "tokenizer_config.json": changes}, culprit)


CHARSMAP = {"normalizer": {"type": "Precompiled", "precompiled_charsmap": "not base64 !"}}

TOKENIZER_CASES = [
    tokenizer_case("eos-token-number", {"eos_token": 5}, "tokenizer_config.json: eos_token = 5: a special token must "
                                                         "be a string"),
    tokenizer_case("pad-token-list", {"pad_token": ["<pad>"]}, r"tokenizer_config.json: pad_token = \['<pad>'\]"),
    tokenizer_case("bos-token-without-content", {"bos_token": {"lstrip": False}},
                   r"tokenizer_config.json: bos_token = \{'lstrip': False\}"),
    tokenizer_case("unk-token-content-number", {"unk_token": {"content": 3}}, "special_tokens_map.json: unk_token = ",
                   file="special_tokens_map.json"),
    tokenizer_case("additional-special-string", {"additional_special_tokens": "<x>"},
                   "additional_special_tokens = '<x>': expected a list"),
    tokenizer_case("additional-special-number", {"additional_special_tokens": ["<a>", 7]},
                   r"additional_special_tokens\[1\] = 7"),
    bpe_case("added-token-missing-content", {"added_tokens_decoder.1": {"special": True}},
                   r"tokenizer_config.json: added_tokens_decoder\['1'\] = .* needs a numeric id and a \"content\""),
    bpe_case("added-token-id-not-number", {"added_tokens_decoder.one": {"content": "<x>"}},
                   r"added_tokens_decoder\['one'\]"),
    bpe_case("added-token-entry-string", {"added_tokens_decoder.2": "</s>"}, r"added_tokens_decoder\['2'\] = '</s>'"),
    bpe_case("added-token-flag-string", {"added_tokens_decoder.1.special": "yes"},
                   r"added_tokens_decoder\['1'\].special = 'yes'"),
    bpe_case("added-tokens-decoder-list", {"added_tokens_decoder": []}, r"added_tokens_decoder = \[\]: expected"),
    tokenizer_case("add-bos-string", {"add_bos_token": "yes"}, "tokenizer_config.json: add_bos_token = 'yes'"),
    tokenizer_case("prefix-space-int", {"add_prefix_space": 0}, "tokenizer_config.json: add_prefix_space = 0"),
    tokenizer_case("tokenizer-class-number", {"tokenizer_class": 5}, "tokenizer_config.json: tokenizer_class = 5"),
    tokenizer_case("eos-token-unknown", {"eos_token": "<nope>"}, r"no usable eos_token \(got '<nope>'\)"),
    tokenizer_case("added-tokens-json-string-id", {"<image>": "319"}, "added_tokens.json: '<image>' = '319'",
                   file="added_tokens.json"),
    file_case("added-tokens-json-list", "opt", {"added_tokens.json": "[319]"},
              "added_tokens.json should hold a JSON object"),
    file_case("tokenizer-json-corrupt", "opt", {"tokenizer.json": "{"}, "tokenizer.json could not be loaded"),
    file_case("tokenizer-json-deep", "opt", {"tokenizer.json": DEEP}, "tokenizer.json could not be loaded"),
    tokenizer_case("t5-eos-token-number", {"eos_token": 1}, "tokenizer_config.json: eos_token = 1", "t5"),
    tokenizer_case("t5-extra-ids-string", {"additional_special_tokens": "<extra_id_0>"},
                   "additional_special_tokens = '<extra_id_0>'", "t5"),
    tokenizer_case("t5-charsmap-not-base64", CHARSMAP, "normalizer.precompiled_charsmap is not base64", "t5",
                   file="tokenizer.json"),
    tokenizer_case("t5-added-tokens-negative", {"<image>": -1}, "added_tokens.json: '<image>' = -1", "t5",
                   file="added_tokens.json"),
    tokenizer_case("itm-cls-token-number", {"cls_token": 101}, "tokenizer_config.json: cls_token = 101", "itm"),
    tokenizer_case("itm-lower-case-string", {"do_lower_case": "true"}, "do_lower_case = 'true'", "itm"),
    tokenizer_case("itm-dec-token-list", {"bos_token": ["[DEC]"]}, "special_tokens_map.json: bos_token", "itm",
                   file="special_tokens_map.json"),
]


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=ids(TOKENIZER_CASES))
def test_tokenizer_files(ctx, case):
    check(ctx, case)


# --- files that disagree with each other: found at load, naming both ----------------------------

MISMATCH_CASES = [
    file_case("vocabulary-smaller-than-tokenizer", "opt", {"added_tokens.json": {"<image>": 319, "<extra>": 320}},
              r"the tokenizer has id 320 \('<extra>'\) but config.json's text_config.vocab_size is 320"),
    file_case("itm-vocabulary-smaller-than-tokenizer", "itm", {"added_tokens.json": {"[DEC]": 96, "[XYZ]": 97}},
              r"the tokenizer has id 97 \('\[XYZ\]'\) but config.json's qformer_config.vocab_size is 97"),
    file_case("query-tokens-differ", "opt", {"processor_config.json": {"num_query_tokens": 4}},
              "processor_config.json has num_query_tokens 4 but config.json has 5"),
    file_case("t5-query-tokens-differ", "t5", {"processor_config.json": {"num_query_tokens": 7}},
              "processor_config.json has num_query_tokens 7 but config.json has 5"),
    file_case("tokenizer-missing", "opt", {"tokenizer.json": DELETE, "vocab.json": DELETE},
              "has preprocessor_config.json.* but no tokenizer"),
    file_case("t5-tokenizer-missing", "t5", {"tokenizer.json": DELETE}, "tokenizer_config.json.* but no tokenizer"),
    file_case("itm-vocab-missing", "itm", {"vocab.txt": DELETE}, "but no tokenizer"),
    file_case("merges-missing", "opt", {"tokenizer.json": DELETE, "merges.txt": DELETE},
              "no tokenizer.json and no vocab.json \\+ merges.txt"),
    file_case("image-size-differs", "opt", {"preprocessor_config.json": {"size": {"height": 32, "width": 32}}},
              "resizes to 32x32 px but config.json's vision_config.image_size is 30"),
    file_case("t5-image-size-differs", "t5", {"preprocessor_config.json": {"size": 24}},
              "resizes to 24x24 px but config.json's vision_config.image_size is 30"),
    file_case("itm-image-size-differs", "itm", {"preprocessor_config.json": {"size": {"height": 12, "width": 12}}},
              "resizes to 12x12 px"),
    file_case("image-token-differs", "opt", {"config.json": {"image_token_index": 318}},
              "image_token_index 318 but the tokenizer's <image> is id 319"),
]


@pytest.mark.parametrize("case", MISMATCH_CASES, ids=ids(MISMATCH_CASES))
def test_files_that_disagree_are_refused_at_load(ctx, case):
    check(ctx, case)


# --- NaN and infinity: in the weights (at load), in pixel_values, and at run time ---------------

def poison(name, value, index=(0,)):
    """An edit for every safetensors file of a folder: `value` at `index` of tensor `name`."""
    def edit(folder):
        for path in sorted(folder.glob("*.safetensors")):
            tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
            if name in tensors:
                array = tensors[name]
                if is_bf16(array):
                    array.reshape(-1)[index] = {NAN: 0x7FC0, INF: 0x7F80, -INF: 0xFF80}[value]
                else:
                    array.reshape(-1)[index] = value
                save_safetensors(path, tensors)
    return edit


def poisoned(name, value, index=(0,)):
    return {".": poison(name, value, index)}


def folder_edit(ctx, base, edits, key):
    """ctx.folder with edits keyed "." applied to the folder itself."""
    if "." in edits:
        if key not in ctx._folders:
            folder = ctx.tmp / f"poisoned-{len(ctx._folders)}"
            shutil.copytree(ctx.bases[base], folder)
            edits["."](folder)
            ctx._folders[key] = folder
        return ctx._folders[key]
    return ctx.folder(base, edits, key)


def weights_case(id, base, name, value, culprit, index=(0,)):
    edits = poisoned(name, value, index)
    return Case(id, lambda ctx: miniblip2.load(folder_edit(ctx, base, edits, id), progress=False), CheckpointError,
                culprit, lambda ctx: caption_argv(base)(ctx, folder_edit(ctx, base, edits, id)))


def nan_model(ctx, base, name, key):
    """The checkpoint with NaN in `name`, loaded without the finite check: NaN reaches the logits."""
    folder = folder_edit(ctx, base, poisoned(name, NAN), key)
    return miniblip2.load(folder, progress=False, check_finite=False)


OPT_NORM = "language_model.model.decoder.final_layer_norm.weight"
T5_NORM = "language_model.decoder.final_layer_norm.weight"


def runtime_case(id, base, name, use):
    def run(ctx):
        model = nan_model(ctx, base, name, f"nan-{base}-{name}")
        return use(ctx, model)
    return Case(id, run, NonFiniteError, r"the scores of new token \d+ are NaN or infinite")


def generate_with(**kwargs):
    def use(ctx, model):
        pixels = np.zeros((2, 3, 30, 30), np.float32)
        return model.generate(pixels, max_new_tokens=4, **kwargs)
    return use


NONFINITE_CASES = [
    weights_case("weights-nan", "opt", "vision_model.embeddings.patch_embedding.weight", NAN,
                 r"weight 'vision_model.embeddings.patch_embedding.weight' \(40, 3, 6, 6\) holds 1 NaN and 0 "
                 "infinite"),
    weights_case("weights-inf", "opt", "qformer.layernorm.bias", INF, "weight 'qformer.layernorm.bias'.* 0 NaN and 1 "
                                                                      "infinite"),
    weights_case("weights-minus-inf-embeddings", "opt", "language_model.model.decoder.embed_tokens.weight", -INF,
                 "language_model.model.decoder.embed_tokens.weight", index=(123,)),
    weights_case("weights-nan-bf16", "opt-bf16", "query_tokens", NAN, "weight 'query_tokens'.* 1 NaN"),
    weights_case("weights-inf-bf16", "opt-bf16", "language_projection.weight", INF, "'language_projection.weight'"),
    weights_case("weights-nan-fp16", "opt-fp16", "qformer.encoder.layer.0.attention.output.dense.weight", NAN,
                 "'qformer.encoder.layer.0.attention.output.dense.weight'"),
    weights_case("weights-nan-sharded", "opt-sharded", "vision_model.post_layernorm.weight", NAN,
                 "'vision_model.post_layernorm.weight'"),
    weights_case("t5-weights-nan", "t5", "language_model.shared.weight", NAN, "'language_model.shared.weight'"),
    weights_case("t5-weights-inf-last", "t5", T5_NORM, INF, f"'{T5_NORM}'", index=(-1,)),
    weights_case("itm-weights-nan", "itm", "itm_head.weight", NAN, "'itm_head.weight'"),
    Case("pixels-nan", lambda ctx: ctx.model().generate(ctx.pixels(fill=NAN), max_new_tokens=2), ImageError,
         "pixel_values contain NaN or infinite values"),
    Case("pixels-inf-forward", lambda ctx: ctx.model().forward(ctx.pixels(fill=INF), *ctx.prompt()), ImageError,
         "pixel_values contain NaN"),
    Case("t5-pixels-minus-inf", lambda ctx: ctx.model("t5").generate(ctx.pixels("t5", fill=-INF)), ImageError,
         "pixel_values contain NaN"),
    Case("itm-pixels-nan", lambda ctx: ctx.model("itm").forward(ctx.pixels("itm", fill=NAN), [[2, 5, 3]]),
         ImageError, "pixel_values contain NaN"),
    runtime_case("runtime-nan-greedy", "opt", OPT_NORM, generate_with()),
    runtime_case("runtime-nan-beams", "opt", OPT_NORM, generate_with(num_beams=3)),
    runtime_case("runtime-nan-sampling", "opt", OPT_NORM, generate_with(do_sample=True, seed=0)),
    runtime_case("runtime-nan-beam-sampling", "opt", OPT_NORM, generate_with(do_sample=True, num_beams=2, seed=0)),
    runtime_case("runtime-nan-caption", "opt", OPT_NORM, lambda ctx, model: model.caption(str(ctx.image))),
    runtime_case("runtime-nan-stream", "opt", OPT_NORM, lambda ctx, model: list(model.stream(str(ctx.image)))),
    runtime_case("runtime-nan-in-one-token", "opt", "language_model.model.decoder.embed_tokens.weight",
                 generate_with()),
    runtime_case("t5-runtime-nan-greedy", "t5", T5_NORM, generate_with()),
    runtime_case("t5-runtime-nan-beams", "t5", T5_NORM, generate_with(num_beams=2, num_return_sequences=2)),
    Case("temperature-overflows", lambda ctx: ctx.model().generate(ctx.pixels(), do_sample=True, temperature=1e-45,
                                                                   seed=0, max_new_tokens=3),
         NonFiniteError, r"NaN or infinite .*temperature=1e-45"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # temperature=1e-45, on purpose
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=ids(NONFINITE_CASES))
def test_nan_and_infinity_are_reported_not_decoded(ctx, case):
    check(ctx, case)


def test_a_nan_in_one_row_of_the_vocabulary_is_still_found(ctx):
    """One NaN entry in the tied embedding/lm_head row of one token makes only that token's logit
    NaN; argmax prefers it, so the chosen score catches it too."""
    model = nan_model(ctx, "opt", "language_model.model.decoder.embed_tokens.weight", "nan-embed-row")
    with pytest.raises(NonFiniteError, match=r"rows \[0, 1\]"):
        generate_with()(ctx, model)


def test_check_finite_false_is_the_documented_way_past_the_scan(ctx):
    folder = folder_edit(ctx, "opt", poisoned(OPT_NORM, NAN), f"nan-opt-{OPT_NORM}")
    model = miniblip2.load(folder, progress=False, check_finite=False)
    logits = model.forward(ctx.pixels(), *ctx.prompt())
    assert np.isnan(logits).all()  # forward gives the logits as they are; generate refuses to decode them


# --- generation arguments: refused before they give garbage or exhaust memory -------------------

def generate_case(id, kwargs, culprit, base="opt", error=PromptError, argv=None):
    def run(ctx):
        return ctx.model(base).generate(ctx.pixels(base), **kwargs)
    return Case(id, run, error, culprit, argv)


def mask_case(id, make_mask, culprit, base="opt", batch=1, forward=False):
    def run(ctx):
        ids, mask = ctx.prompt(base, batch)
        mask = make_mask(mask.copy())
        if forward:
            return ctx.model(base).forward(ctx.pixels(base, batch), ids, mask)
        return ctx.model(base).generate(ctx.pixels(base, batch), ids, mask, max_new_tokens=2)
    return Case(id, run, PromptError, culprit)


def flags(*extra):
    return lambda ctx: ["caption", str(ctx.image), "--weights", str(ctx.folder("opt")), "--max-new-tokens", "3",
                        *extra]


def set_at(value, index=(0, -1)):
    def make(mask):
        mask[index] = value
        return mask
    return make


def zero_row(row):
    def make(mask):
        mask[row] = 0
        return mask
    return make


GENERATION_CASES = [
    generate_case("temperature-inf", dict(do_sample=True, temperature=INF), r"`temperature` \(=inf\)",
                  argv=flags("--do-sample", "--temperature", "inf")),
    generate_case("temperature-nan", dict(do_sample=True, temperature=NAN), r"`temperature` \(=nan\)",
                  argv=flags("--do-sample", "--temperature", "nan")),
    generate_case("temperature-zero", dict(do_sample=True, temperature=0), r"`temperature` \(=0(\.0)?\)",
                  argv=flags("--do-sample", "--temperature", "0")),
    generate_case("temperature-string", dict(temperature="1"), r"`temperature` \(='1'\)"),
    generate_case("t5-temperature-inf", dict(do_sample=True, temperature=INF), "`temperature`", "t5"),
    generate_case("repetition-penalty-inf", dict(repetition_penalty=INF), "`repetition_penalty`.*inf",
                  argv=flags("--repetition-penalty", "inf")),
    generate_case("repetition-penalty-zero", dict(repetition_penalty=0.0), "`repetition_penalty`.*0.0"),
    generate_case("top-p-nan", dict(do_sample=True, top_p=NAN), "`top_p`.*nan", argv=flags("--top-p", "nan")),
    generate_case("top-p-above-one", dict(do_sample=True, top_p=1.5), "`top_p`.*1.5"),
    generate_case("top-k-negative", dict(top_k=-1), "`top_k` must be an integer >= 0, but is -1",
                  argv=flags("--top-k", "-1")),
    generate_case("num-return-sequences-millions", dict(do_sample=True, num_return_sequences=10**7),
                  r"num_return_sequences=10000000.*GiB available"),
    generate_case("num-beams-millions", dict(num_beams=10**7), r"num_beams=10000000.*GiB available",
                  argv=flags("--num-beams", "10000000")),
    generate_case("t5-num-return-sequences-millions", dict(num_beams=10**6, num_return_sequences=10**6),
                  r"num_return_sequences=1000000.*GiB", "t5"),
    generate_case("t5-max-new-tokens-billions", dict(max_new_tokens=10**9), r"max_new_tokens=1000000000.*GiB", "t5"),
    generate_case("min-new-above-max", dict(max_new_tokens=5, min_new_tokens=10),
                  r"`min_new_tokens` \(10\) is more than the 5 new tokens"),
    generate_case("t5-min-new-above-max", dict(max_new_tokens=2, min_new_tokens=3), "`min_new_tokens` \\(3\\)", "t5"),
    generate_case("min-length-above-max", dict(max_new_tokens=5, min_length=500), r"`min_length` \(500"),
    generate_case("max-new-tokens-string", dict(max_new_tokens="20"), "`max_new_tokens` must be an integer"),
    generate_case("max-new-tokens-zero", dict(max_new_tokens=0), "`max_new_tokens` must be an integer >= 1, but is 0",
                  argv=flags("--max-new-tokens", "0")),
    generate_case("max-new-tokens-negative", dict(max_new_tokens=-3), "`max_new_tokens`.*-3",
                  argv=flags("--max-new-tokens", "-3")),
    generate_case("max-length-float", dict(max_length=50.0), "`max_length` must be an integer"),
    generate_case("seed-negative", dict(do_sample=True, seed=-1), "seed must be a non-negative integer, but is -1",
                  argv=flags("--do-sample", "--seed", "-1")),
    generate_case("seed-float", dict(do_sample=True, seed=1.5), "seed must be a non-negative integer, but is 1.5"),
    generate_case("generator-int", dict(do_sample=True, generator=5), "generator must be a numpy.random.Generator"),
    generate_case("do-sample-string", dict(do_sample="yes"), "`do_sample` must be True or False, but is 'yes'"),
    generate_case("early-stopping-string", dict(num_beams=2, early_stopping="soon"), "`early_stopping`.*'soon'"),
    generate_case("argument-eos-empty-list", dict(eos_token_id=[]), r"`eos_token_id`.*but is \[\]"),
    generate_case("argument-eos-past-vocab", dict(eos_token_id=10**6), "`eos_token_id`.*1000000"),
    generate_case("length-penalty-inf", dict(num_beams=2, length_penalty=INF), "`length_penalty`.*inf"),
    generate_case("num-beams-float", dict(num_beams=2.0), "`num_beams` must be an integer >= 1, but is 2.0"),
    generate_case("num-beams-zero", dict(num_beams=0), "`num_beams`.*0", argv=flags("--num-beams", "0")),
    generate_case("greedy-many-sequences", dict(num_return_sequences=3), "`num_return_sequences`.*got 3"),
    generate_case("unknown-argument", dict(max_tokens=5), "unknown generation argument.* max_tokens"),
    generate_case("use-cache-string", dict(use_cache="no"), "`use_cache` must be True or False, but is 'no'"),
    generate_case("interpolate-string", dict(interpolate_pos_encoding="yes"), "`interpolate_pos_encoding` must be"),
    generate_case("streamer-object", dict(streamer=object()), "`streamer` must have put.* got a object"),
    generate_case("streamer-function", dict(streamer=print), "`streamer` must have put.*builtin_function"),
    generate_case("streamer-with-beams", dict(streamer=TextStreamer(None), num_beams=2),
                  "`streamer` cannot be used with beam search"),
    generate_case("t5-streamer-string", dict(streamer="stdout"), "`streamer` must have put.* got a str", "t5"),
    mask_case("mask-two", set_at(2), r"attention_mask must hold only 0 \(padding\) and 1.* found \[2\]"),
    mask_case("mask-negative", set_at(-1), r"attention_mask must hold only 0.*found \[-1\]"),
    mask_case("mask-float", lambda mask: mask * 0.5, "attention_mask must be a 2-D integer array"),
    mask_case("mask-all-zero", lambda mask: mask * 0, "attention_mask row 0 is all 0"),
    mask_case("mask-one-row-zero", zero_row(1), "attention_mask row 1 is all 0", batch=2),
    mask_case("mask-two-forward", set_at(7), "attention_mask must hold only 0.*found \\[7\\]", forward=True),
    mask_case("t5-mask-two", set_at(2), "attention_mask must hold only 0", "t5"),
    mask_case("t5-mask-zero-row", zero_row(0), "attention_mask row 0 is all 0", "t5", batch=2),
    Case("itm-mask-two", lambda ctx: ctx.model("itm").forward(ctx.pixels("itm"), [[2, 5, 3]], [[1, 2, 1]]),
         PromptError, "attention_mask must hold only 0"),
    Case("itm-text-mask-zero", lambda ctx: ctx.model("itm").forward(ctx.pixels("itm"), [[2, 5, 3]], [[0, 0, 0]]),
         PromptError, "attention_mask row 0 is all 0"),
    Case("ids-ragged", lambda ctx: ctx.model().generate(ctx.pixels(batch=2), [[319] * 5 + [2], [2]]), PromptError,
         "input_ids must be a 2-D integer array"),
    Case("ids-empty", lambda ctx: ctx.model().generate(ctx.pixels(), np.zeros((1, 0), np.int64)), PromptError,
         r"input_ids must be a 2-D integer array .*with at least one token; got int64 \(1, 0\)"),
    Case("ids-strings", lambda ctx: ctx.model().forward(ctx.pixels(), [["a", "b"]]), PromptError,
         "input_ids must be a 2-D integer array"),
    Case("t5-decoder-ids-negative", lambda ctx: ctx.model("t5").forward(ctx.pixels("t5"), *ctx.prompt("t5"),
                                                                        decoder_input_ids=[[0, -4]]),
         PromptError, r"decoder_input_ids must lie in \[0, 160\)"),
]


@pytest.mark.parametrize("case", GENERATION_CASES, ids=ids(GENERATION_CASES))
def test_generation_arguments(ctx, case):
    check(ctx, case)


# --- images, paths and prompts ----------------------------------------------------------------

LONG = "x" * 5000


def image_case(id, image, culprit, base="opt", error=ImageError, cli_path=None, **kwargs):
    """caption(image): image may be a callable of ctx (for paths under ctx.tmp)."""
    def run(ctx):
        value = image(ctx) if callable(image) else image
        return ctx.model(base).caption(value, **kwargs)

    def argv(ctx):
        return ["caption", cli_path(ctx) if callable(cli_path) else cli_path, "--weights", str(ctx.folder(base))]
    return Case(id, run, error, culprit, argv if cli_path is not None else None)


def load_case(id, path, culprit, cli_path=None):
    def run(ctx):
        return miniblip2.load(path(ctx) if callable(path) else path)

    def argv(ctx):
        return ["caption", str(ctx.image), "--weights", cli_path(ctx) if callable(cli_path) else cli_path]
    return Case(id, run, CheckpointError, culprit, argv if cli_path is not None else None)


def not_an_image(ctx):
    path = ctx.tmp / "notes.txt"
    path.write_text("not a picture")
    return str(path)


IMAGE_CASES = [
    image_case("caption-empty-list", [], "image is an empty list"),
    image_case("caption-empty-list-with-prompt", [], "image is an empty list", prompt="Question: what? Answer:"),
    image_case("t5-caption-empty-tuple", (), "image is an empty list", "t5"),
    Case("pixels-batch-zero", lambda ctx: ctx.model().generate(np.zeros((0, 3, 30, 30), np.float32)), ImageError,
         r"pixel_values holds no image \(batch size 0\)"),
    Case("pixels-tiny-interpolated", lambda ctx: ctx.model().generate(np.zeros((1, 3, 3, 3), np.float32),
                                                                      interpolate_pos_encoding=True),
         ImageError, "pixel_values of 3x3 px are smaller than one 6x6 patch"),
    Case("t5-pixels-tiny-interpolated", lambda ctx: ctx.model("t5").forward(np.zeros((1, 3, 30, 2), np.float32),
                                                                            *ctx.prompt("t5"),
                                                                            interpolate_pos_encoding=True),
         ImageError, "pixel_values of 30x2 px are smaller than one 6x6 patch"),
    Case("itm-pixels-tiny", lambda ctx: ctx.model("itm").forward(np.zeros((1, 3, 5, 5), np.float32), [[2, 5, 3]],
                                                                 interpolate_pos_encoding=True),
         ImageError, "pixel_values of 5x5 px"),
    Case("pixels-strings", lambda ctx: ctx.model().generate(np.full((1, 3, 30, 30), "a")), ImageError,
         "pixel_values must hold real numbers .* got dtype <U1"),
    Case("pixels-objects", lambda ctx: ctx.model().forward(np.empty((1, 3, 30, 30), object), *ctx.prompt()),
         ImageError, "pixel_values must hold real numbers .* got dtype object"),
    Case("pixels-complex", lambda ctx: ctx.model("t5").generate(np.zeros((1, 3, 30, 30), complex)), ImageError,
         "got dtype complex128"),
    image_case("image-none", None, "cannot use a NoneType as an image"),
    image_case("image-empty-path", "", "the image path is an empty string", cli_path=""),
    image_case("image-blank-path", "   ", "the image path is an empty string", cli_path="  "),
    image_case("image-path-too-long", LONG + ".png", "the image path .* cannot be used .*File name too long",
               cli_path=LONG + ".png"),
    image_case("image-path-unencodable", "\ud800.png", "the image path .* cannot encode", cli_path="\ud800.png"),
    image_case("image-path-undecodable-bytes", "\udcffcat.png", "no such file", cli_path="\udcffcat.png"),
    image_case("image-url", "https://example.com/cat.jpg", "the image path 'https://example.com/cat.jpg' is a URL",
               cli_path="https://example.com/cat.jpg"),
    image_case("image-folder", lambda ctx: ctx.tmp, "is a folder, not a file", cli_path=lambda ctx: str(ctx.tmp)),
    image_case("image-missing", lambda ctx: ctx.tmp / "missing.png", "missing.png: no such file",
               cli_path=lambda ctx: str(ctx.tmp / "missing.png")),
    image_case("image-bytes", b"cat.png", "cannot use a bytes as an image"),
    image_case("image-int", 5, "cannot use a int as an image"),
    image_case("image-not-an-image", not_an_image, "notes.txt could not be read as an image", cli_path=not_an_image),
    image_case("t5-image-url", "http://example.com/a.png", "is a URL", "t5", cli_path="http://example.com/a.png"),
    image_case("image-array-channels-first", np.zeros((3, 30, 30), np.uint8), r"got shape \(3, 30, 30\)"),
    load_case("load-none", None, "the checkpoint folder is None"),
    load_case("load-empty", "", "the checkpoint folder is an empty string", cli_path=""),
    load_case("load-too-long", LONG, "the checkpoint folder .* cannot be used", cli_path=LONG),
    load_case("load-unencodable", "\ud800", "the checkpoint folder .* cannot encode", cli_path="\ud800"),
    load_case("load-undecodable-bytes", "\udcffweights", "does not exist", cli_path="\udcffweights"),
    load_case("load-url", "https://huggingface.co/Salesforce/blip2-opt-2.7b", "is a URL; miniblip2 reads local files",
              cli_path="https://huggingface.co/Salesforce/blip2-opt-2.7b"),
    # A hub id that no cache holds, offline (see `no_hub`): said at once, naming the id.
    load_case("load-hub-id", "miniblip2-tests/no-such-checkpoint", "no-such-checkpoint is not a folder here",
              cli_path="miniblip2-tests/no-such-checkpoint"),
    load_case("load-bytes", b"weights", "the checkpoint folder is bytes"),
    load_case("load-int", 7, "the checkpoint folder is a int"),
    load_case("load-a-file", lambda ctx: ctx.image, "picture.png is a file, not a folder",
              cli_path=lambda ctx: str(ctx.image)),
    load_case("load-missing", lambda ctx: ctx.tmp / "nowhere", "nowhere does not exist",
              cli_path=lambda ctx: str(ctx.tmp / "nowhere")),
    Case("module-caption-weights-empty", lambda ctx: miniblip2.caption(str(ctx.image), weights=""), CheckpointError,
         "the checkpoint folder is an empty string"),
    image_case("prompt-int", lambda ctx: str(ctx.image), r"prompt must be None, a str .* got a int \('5'\)",
               error=PromptError, prompt=5),
    image_case("prompt-bytes", lambda ctx: str(ctx.image), "prompt must be None, a str .* got a bytes",
               error=PromptError, prompt=b"Question: what? Answer:"),
    image_case("prompt-list-with-int", lambda ctx: [str(ctx.image)] * 2, "prompt must be .* got a list",
               error=PromptError, prompt=["a", 3]),
    image_case("prompt-empty-list", lambda ctx: str(ctx.image), "prompt must be .* got a list", error=PromptError,
               prompt=[]),
    image_case("prompt-count", lambda ctx: [str(ctx.image)], "1 images but 2 prompts", error=PromptError,
               prompt=["a", "b"]),
    image_case("t5-prompt-bytes", lambda ctx: str(ctx.image), "prompt must be .* got a bytes", "t5",
               error=PromptError, prompt=b"x"),
    Case("stream-prompt-list", lambda ctx: list(ctx.model().stream(str(ctx.image), prompt=["a"])), PromptError,
         "stream takes one prompt, a str; got a list"),
    Case("stream-image-list", lambda ctx: list(ctx.model().stream([str(ctx.image)])), PromptError,
         "stream takes one image"),
    Case("itm-match-no-texts", lambda ctx: ctx.model("itm").match(str(ctx.image), []), PromptError,
         "texts is an empty list"),
    Case("itm-match-image-url", lambda ctx: ctx.model("itm").match("https://x.org/a.png", ["a"]), ImageError,
         "is a URL"),
    Case("itm-similarity-no-images", lambda ctx: ctx.model("itm").similarity([], ["a"]), ImageError,
         "images is an empty list"),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=ids(IMAGE_CASES))
def test_images_paths_and_prompts(ctx, case):
    check(ctx, case)


def test_lab_is_a_colour_space_not_an_alpha_channel():
    """LAB's bands are L, A and B: its A is the green-red axis, not opacity. Compositing it onto
    white as if it were alpha gives wrong pixels; it must convert as a colour picture."""
    from PIL import ImageCms

    from miniblip2.checkpoint.image import is_transparent, load_image
    rgb = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(rgb, to_lab)
    assert lab.getbands() == ("L", "A", "B") and not is_transparent(lab)
    assert all(is_transparent(rgb.convert(mode)) for mode in ("RGBA", "LA", "PA"))
    # LAB -> sRGB by PIL's colour conversion, close to the original (LAB keeps 8 bits a band)
    np.testing.assert_array_equal(np.asarray(load_image(lab)), np.asarray(lab.convert("RGB")))
    assert np.abs(np.asarray(load_image(lab), np.int16) - np.asarray(rgb, np.int16)).mean() < 3


# --- error classes and messages ---------------------------------------------------------------

CLASS_CASES = [
    Case("dtype-float64", lambda ctx: miniblip2.load(ctx.folder("opt"), dtype="float64"), DeviceError,
         "dtype 'float64' is not one miniblip2 computes in"),
    Case("dtype-none", lambda ctx: miniblip2.load(ctx.folder("opt"), dtype=None), DeviceError, "dtype None is not one"),
    Case("dtype-garbage", lambda ctx: miniblip2.load(ctx.folder("t5"), dtype="("), DeviceError, "dtype '\\(' is not"),
    Case("dtype-int", lambda ctx: miniblip2.load(ctx.folder("itm"), dtype=5), DeviceError, "dtype 5 is not one"),
    Case("t5-float16", lambda ctx: miniblip2.load(ctx.folder("t5"), dtype="float16"), CheckpointError,
         "Flan-T5 cannot run in float16"),
    Case("device-tpu", lambda ctx: miniblip2.load(ctx.folder("opt"), device="tpu"), DeviceError,
         "device 'tpu' is not one of"),
    Case("device-none", lambda ctx: miniblip2.load(ctx.folder("opt"), device=None), DeviceError,
         "device None is not one of"),
    Case("captioner-cannot-match", lambda ctx: ctx.model().match(str(ctx.image), ["a"]), CheckpointError,
         "Blip2ForConditionalGeneration, which writes text but cannot score",
         lambda ctx: ["match", str(ctx.image), "a", "--weights", str(ctx.folder("opt"))]),
]


@pytest.mark.parametrize("case", CLASS_CASES, ids=ids(CLASS_CASES))
def test_error_classes_name_the_right_culprit(ctx, case):
    check(ctx, case)


# --- the command line: every case above that it can express, and its own ------------------------

def cli_case(id, argv, culprit):
    return Case(id, None, MiniBlip2Error, culprit, argv)


CLI_CASES = [
    cli_case("no-command", lambda ctx: [], "the following arguments are required: command"),
    cli_case("unknown-command", lambda ctx: ["describe", "x.png"], "invalid choice: 'describe'"),
    cli_case("no-image", lambda ctx: ["caption"], "the following arguments are required: image"),
    cli_case("max-new-tokens-word", flags("--max-new-tokens", "many"), "--max-new-tokens: invalid int value: 'many'"),
    cli_case("unknown-flag", flags("--beams", "3"), "unrecognized arguments: --beams 3"),
    cli_case("cli-dtype-float64", flags("--dtype", "float64"), "--dtype: invalid choice: 'float64'"),
    cli_case("cli-device-tpu", flags("--device", "tpu"), "--device: invalid choice: 'tpu'"),
    cli_case("top-k-float", flags("--top-k", "1.5"), "--top-k: invalid int value: '1.5'"),
    cli_case("match-no-text", lambda ctx: ["match", str(ctx.image)], "the following arguments are required: text"),
    cli_case("demo-out-unwritable", lambda ctx: ["demo", "--weights", str(ctx.folder("opt")), "--out",
                                                 str(ctx.tmp / "no-such-folder" / "scene.png")],
             "could not save the scene to .*scene.png"),
]

ALL_CASES = (CONFIG_CASES + PROCESSOR_CASES + TOKENIZER_CASES + MISMATCH_CASES + NONFINITE_CASES + GENERATION_CASES
             + IMAGE_CASES + CLASS_CASES + CLI_CASES)
COMMAND_LINE = [case for case in ALL_CASES if case.argv is not None]


def test_the_tables_cover_enough_distinct_bad_inputs():
    assert len({case.id for case in ALL_CASES}) == len(ALL_CASES) >= 120
    assert len(COMMAND_LINE) >= 100


@pytest.mark.parametrize("case", COMMAND_LINE, ids=ids(COMMAND_LINE))
def test_cli_reports_in_one_line(ctx, case, capsys):
    """No traceback leaves the CLI: exit code 2, one line on stderr naming the culprit, no output."""
    code = cli.main(case.argv(ctx))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("miniblip2: error: ") and "Traceback" not in err
    assert re.search(case.culprit, err), err
    assert out == ""


def test_cli_survives_a_terminal_that_cannot_show_the_path(ctx, capsys, monkeypatch):
    """A path the terminal's encoding cannot show (bytes that are not UTF-8 come to Python as lone
    surrogates) is escaped in the message instead of raising UnicodeEncodeError."""
    import io
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr("sys.stderr", stderr)
    assert cli.main(["caption", "\udcffcaf\u00e9.png", "--weights", str(ctx.folder("opt"))]) == 2
    stderr.flush()
    message = stderr.buffer.getvalue().decode("ascii")
    assert message.startswith("miniblip2: error: ") and "\\udcffcaf\\xe9.png: no such file" in message


def test_an_unexpected_exception_is_one_line_too(ctx, capsys, monkeypatch):
    """A bug (not a bad input) still prints one line, with exit code 1 and how to see the traceback."""
    monkeypatch.delenv("MINIBLIP2_TRACEBACK", raising=False)
    monkeypatch.setattr(cli, "load", lambda *args, **kwargs: 1 / 0)
    assert cli.main(["caption", str(ctx.image), "--weights", str(ctx.folder("opt"))]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError" in err and "MINIBLIP2_TRACEBACK=1" in err
    monkeypatch.setenv("MINIBLIP2_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["caption", str(ctx.image), "--weights", str(ctx.folder("opt"))])


def test_good_input_still_works_after_the_checks(ctx):
    """The checks refuse only what is wrong: the base checkpoints load and caption, with masks,
    settings and prompts at their edges."""
    model = ctx.model()
    assert isinstance(model.caption(str(ctx.image), max_new_tokens=3), str)
    ids, mask = ctx.prompt(batch=2)
    model.generate(ctx.pixels(batch=2), ids, mask, max_new_tokens=3, min_new_tokens=3, do_sample=True,
                   temperature=1e-3, top_p=1.0, seed=0)
    assert isinstance(ctx.model("t5").caption(str(ctx.image), prompt="what?", max_new_tokens=2), str)
    assert ctx.model("itm").match(str(ctx.image), "a red circle") >= 0
