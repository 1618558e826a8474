"""BLIP-2 for image-to-text (`Blip2ForConditionalGeneration` in transformers' modeling_blip_2.py),
with either of its language models:

image -> processor -> pixel_values [B, 3, 224, 224]
      -> vision_model -> image_embeds [B, 257, 1408]
      -> qformer (32 queries) -> query_output [B, 32, 768]
      -> language_projection -> image features [B, 32, D], put at the 32 `<image>` positions
      -> OPT, decoder-only (blip2-opt-*): logits over the prompt, new tokens appended to it
         or T5, encoder-decoder (blip2-flan-t5-*): the encoder reads the prompt once, the
         decoder writes from `decoder_start_token_id`
      -> greedy, beam search or sampling (generation/loops.py) -> ids -> text

Speaks transformers' vocabulary: `forward`, `generate`, `batch_decode`, `processor(images=...,
text=...)`. The weights live on one device (`load(..., device="cpu" | "cuda")`, see
runtime/device.py) in one dtype (see runtime/precision.py). Inputs follow the weights; `forward`
and `generate` give NumPy back. The stages (`vision`, `qformer`, `project`) take and give arrays
on the model's device, so they chain there without copies.

Legend: B batch, T prompt tokens, Q queries (32), Dq Q-Former width (768), D text width (2560
for OPT-2.7b, 2048 for Flan-T5-xl).
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import opt, t5
from .checkpoint.config import check_activation, check_field, check_heads, from_dict, read_config_json
from .checkpoint.loading import check_processor_fits, check_tokenizer_present, checkpoint_folder, load_weights
from .checkpoint.processor import has_processor_files, load_processor
from .errors import CheckpointError, PromptError
from .generation.chat import chat_prompt
from .generation.loops import expand_inputs
from .generation.settings import check_memory, generation_defaults, random_generator, resolve_generation_config
from .glue import ImageModel, ImageToText, as_int_array, check_mask
from .nn import linear, linear_shapes, namespace
from .qformer import QFormerConfig, qformer_model
from .qformer import expected_shapes as qformer_shapes
from .runtime.device import device_generator, memory_available, on_host, to_numpy
from .runtime.precision import check_dtype, like_weight, widen
from .runtime.trace import record, trace
from .vision import VisionConfig
from .vision import expected_shapes as vision_shapes


# Blip2Config: the three towers and the glue between them.
@dataclass(frozen=True)
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: opt.OPTConfig | t5.T5Config = field(default_factory=opt.OPTConfig)
    num_query_tokens: int = 32
    image_token_index: int | None = None


# text_config, by its model_type: the language model's own config, checked by its own file.
def text_config(values: dict):
    if not isinstance(values, dict):
        return from_dict(opt.OPTConfig, values, "text_config")  # the error: it should be an object
    model_type = values.get("model_type", "opt")
    if model_type == "t5":
        return t5.t5_config(values)
    if model_type != "opt":
        raise CheckpointError(f"config.json: text_config.model_type is {model_type!r}; BLIP-2 runs with "
                              "'opt' (blip2-opt-2.7b, -6.7b) or 't5' (blip2-flan-t5-xl, -xxl)")
    config = from_dict(opt.OPTConfig, values, "text_config")
    if config.word_embed_proj_dim is None:
        config = dataclasses.replace(config, word_embed_proj_dim=config.hidden_size)
    check_activation("text_config.activation_function", config.activation_function)
    check_heads("text_config", config.hidden_size, config.num_attention_heads)
    opt.check_config(config)
    return config


# A sub-config of config.json: absent or null means every default; anything else must be an
# object (from_dict says so), not an empty list or string read as "all defaults".
def section(values: dict, key: str):
    value = values.get(key)
    return {} if value is None else value


# A value of config.json's top level (num_query_tokens, image_token_index), checked as the
# towers' fields are.
def glue_value(values: dict, name: str, annotation, default=None):
    return check_field(f"config.json: {name}", name, values.get(name, default), annotation)


# vision_config and qformer_config, read the same way by every BLIP-2 class (this file's and
# blip2_retrieval.py's): the Q-Former cross-attends to the vision width, whatever its config says.
def image_tower_configs(values: dict):  # -> VisionConfig, QFormerConfig
    vision = from_dict(VisionConfig, section(values, "vision_config"), "vision_config")
    qformer = from_dict(QFormerConfig, section(values, "qformer_config"), "qformer_config")
    qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
    for where, tower in [("vision_config", vision), ("qformer_config", qformer)]:
        check_activation(f"{where}.hidden_act", tower.hidden_act)
        check_heads(where, tower.hidden_size, tower.num_attention_heads)
    check_vision(vision)
    return vision, qformer


# The processor gives RGB pixels, and a patch must fit in the image.
def check_vision(vision) -> None:
    if vision.num_channels != 3:
        raise CheckpointError(f"config.json: vision_config.num_channels = {vision.num_channels}: BLIP-2 reads "
                              "RGB images (3 channels); fix or re-download config.json")
    if vision.patch_size > vision.image_size:
        raise CheckpointError(f"config.json: vision_config.patch_size = {vision.patch_size} is larger than "
                              f"vision_config.image_size = {vision.image_size}, so an image has no patch; "
                              "fix or re-download config.json")


# Blip2Config.from_pretrained: the three sub-configs plus the glue values.
def config_from_dict(values: dict, needs_image_token=True) -> Blip2Config:
    if not isinstance(values, dict) or values.get("model_type") != "blip-2":
        found = values.get("model_type") if isinstance(values, dict) else values
        raise CheckpointError(
            f"config.json has model_type {found!r}; this is the BLIP-2 family's loader "
            "(model_type 'blip-2', e.g. Salesforce/blip2-opt-2.7b)")
    vision, qformer = image_tower_configs(values)
    text = text_config(section(values, "text_config"))
    image_token = values.get("image_token_index", values.get("image_token_id"))
    config = Blip2Config(vision=vision, qformer=qformer, text=text,
                         num_query_tokens=glue_value(values, "num_query_tokens", int, 32),
                         image_token_index=check_field("config.json: image_token_index", "image_token_index",
                                                       image_token, int | None))
    if needs_image_token and config.image_token_index is None:
        raise CheckpointError(
            "config.json has no image_token_index: this is a pre-2024 BLIP-2 config whose processor does "
            "not insert <image> tokens. Download the current revision of the checkpoint.")
    if config.image_token_index is not None and config.image_token_index >= text.vocab_size:
        raise CheckpointError(
            f"config.json: image_token_index = {config.image_token_index} is not below text_config.vocab_size = "
            f"{text.vocab_size}, so the language model has no row for <image>; the config is inconsistent: "
            "re-download config.json")
    return config


def read_config(folder) -> Blip2Config:
    return config_from_dict(read_config_json(folder))


def language_model(config):  # the tower file of the text model: opt or t5
    return t5 if config.text.is_encoder_decoder else opt


# Every key of a Blip2ForConditionalGeneration checkpoint with its shape, from the config alone:
# each tower lists its own, under the prefix the glue gives it.
def expected_shapes(config):
    prefixed = lambda prefix, shapes: {f"{prefix}.{k}": v for k, v in shapes.items()}
    return {"query_tokens": (1, config.num_query_tokens, config.qformer.hidden_size),
            **prefixed("vision_model", vision_shapes(config.vision)),
            **prefixed("qformer", qformer_shapes(config.qformer)),
            **linear_shapes("language_projection", config.text.hidden_size, config.qformer.hidden_size),
            **prefixed("language_model", language_model(config).expected_shapes(config.text))}


# The weights a checkpoint may leave out because they share another's storage.
def tied_weights(config):
    tied = language_model(config).tied_weights(config.text)
    return {f"language_model.{name}": f"language_model.{source}" for name, source in tied.items()}


# The KV cache one row keeps per position, in float32 (keys and values of every decoder layer;
# for T5 the cross-attention's too), plus the row's embedding: what settings.check_memory counts.
def bytes_per_position(text):
    if text.is_encoder_decoder:
        return 4 * (4 * text.num_decoder_layers * text.num_heads * text.d_kv + text.d_model)
    return 4 * (2 * text.num_hidden_layers * text.hidden_size + text.hidden_size)


# Blip2ForConditionalGeneration._keep_in_fp32_modules, which transformers applies for float16 only.
KEEP_IN_FLOAT32 = ("query_tokens", "qformer.")


class Blip2Stages(ImageModel):
    """What every BLIP-2 class shares (this file's and blip2_retrieval.py's): the ViT, the
    processor and the checks on inputs (glue.ImageModel), and the Q-Former's query path."""

    def __init__(self, config, weights, processor=None):
        super().__init__(config, weights, processor)
        self.xp = namespace(weights["query_tokens"])  # numpy or cupy: where the weights live

    # In float16 the Q-Former is float32 (transformers' _keep_in_fp32_modules): the image
    # embeddings are cast up to its dtype here (and its output back down by the next module).
    def qformer(self, image_embeds):  # [B, 257, 1408] -> [B, 32, 768]
        w = self.weights["qformer"]
        image_embeds = like_weight(self.xp.asarray(image_embeds), w["layernorm"]["weight"])
        return qformer_model(widen(self.weights["query_tokens"]), image_embeds, w, self.config.qformer)


class Blip2(Blip2Stages, ImageToText):
    """Blip2ForConditionalGeneration: config, nested weights, processor, generation defaults.
    generate, caption and stream are glue.ImageToText's, over `_prepare_generation` and
    `_caption_inputs` below."""

    def __init__(self, config, weights, processor=None):
        super().__init__(config, weights, processor)
        self.generation_defaults = generation_defaults(config)
        self.lm = language_model(config)  # the tower file of the text model: opt or t5

    # A captioning checkpoint has no image-text matching heads: say which checkpoints have them.
    def match(self, image, texts):
        raise CheckpointError("this checkpoint is a Blip2ForConditionalGeneration, which writes text but cannot "
                              "score image-text pairs; load an image-text retrieval checkpoint "
                              "(Salesforce/blip2-itm-vit-g or blip2-itm-vit-g-coco) for match and similarity")

    def similarity(self, images, texts):
        self.match(images, texts)

    # --- the stages, each returning what the reference returns at that point -------------

    def project(self, query_output):  # [B, 32, 768] -> [B, 32, 2560]
        w = self.weights["language_projection"]
        return record(w, linear(like_weight(self.xp.asarray(query_output), w["weight"]), w))

    def image_features(self, pixel_values, interpolate_pos_encoding=False):  # [B, 3, H, W] -> [B, Q, D]
        return self.project(self.qformer(self.vision(pixel_values, interpolate_pos_encoding)))

    # Blip2ForConditionalGeneration.forward/generate: embed the prompt, then masked_scatter the
    # image features into the rows of the `<image>` tokens, in order.
    def embed_inputs(self, input_ids, image_features):  # [B, T], [B, Q, D] -> [B, T, D]
        xp = namespace(image_features)
        is_image = input_ids == self.config.image_token_index  # [B, T]
        counts = is_image.sum(axis=1)
        if not np.all(counts == self.config.num_query_tokens):
            raise PromptError(
                f"each row of input_ids needs exactly {self.config.num_query_tokens} <image> tokens "
                f"(id {self.config.image_token_index}); found {counts.tolist()}. Build inputs with model.processor")
        embeds = self.lm.embed_tokens(xp.asarray(input_ids), self.weights["language_model"])  # [B, T, D]
        embeds[xp.asarray(is_image)] = image_features.reshape(-1, image_features.shape[-1])
        return embeds

    def forward(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
                interpolate_pos_encoding=False):
        """Logits as `Blip2ForConditionalGeneration(...).logits`: [B, T, V] for every prompt position
        (OPT), or [B, S, V] for every position of `decoder_input_ids` [B, S] (T5; by default the
        decoder start token alone, the logits of the first new token)."""
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
        self._check_length(attention_mask, 0)
        features = self.image_features(pixel_values, interpolate_pos_encoding)
        embeds = self.embed_inputs(input_ids, features)
        w, text, mask = self.weights["language_model"], self.config.text, self.xp.asarray(attention_mask)
        if not text.is_encoder_decoder:
            return to_numpy(opt.lm_head(opt.opt_decoder(embeds, mask, w, text), w))
        if decoder_input_ids is None:
            decoder_input_ids = np.full((input_ids.shape[0], 1), text.decoder_start_token_id, dtype=np.int64)
        decoder_input_ids = self._check_ids(decoder_input_ids, "decoder_input_ids")
        return to_numpy(t5.t5_forward(embeds, mask, self.xp.asarray(decoder_input_ids), w, text))

    # Blip2ForConditionalGeneration.generate up to `language_model.generate`: the inputs checked,
    # the settings resolved, the image features put into the prompt's embeddings, every row
    # repeated for its beams or samples (GenerationMixin._expand_inputs_for_generation), and
    # the language model's decoder for the loops (see generation/loops.py).
    def _prepare_generation(self, pixel_values, input_ids, attention_mask, seed, generator, use_cache,
                            interpolate_pos_encoding, arguments):
        batch = self._check_pixels(pixel_values).shape[0]
        for name, flag in (("use_cache", use_cache), ("interpolate_pos_encoding", interpolate_pos_encoding)):
            if not isinstance(flag, (bool, np.bool_)):
                raise PromptError(f"`{name}` must be True or False, but is {flag!r}")
        if input_ids is None:  # no prompt: the image tokens and BOS, as the reference builds them
            start = [self.config.image_token_index] * self.config.num_query_tokens + [self.config.text.bos_token_id]
            input_ids = np.full((batch, len(start)), start, dtype=np.int64)
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
        text = self.config.text
        # T5's decoder starts from one token; OPT continues the prompt, within its position table
        prompt_length = 1 if text.is_encoder_decoder else input_ids.shape[1]
        max_positions = None if text.is_encoder_decoder else text.max_position_embeddings
        gen = resolve_generation_config(self.generation_defaults, arguments, prompt_length, max_positions,
                                        text.vocab_size)
        self._check_length(attention_mask, gen.max_new_tokens)
        positions = input_ids.shape[1] + gen.max_new_tokens  # T5: the encoder's tokens and the decoder's
        check_memory(gen, batch, positions, bytes_per_position(text), text.vocab_size, memory_available(self.xp),
                     "on the host" if on_host(self.xp) else "on the GPU")
        embeds = self.embed_inputs(input_ids, self.image_features(pixel_values, interpolate_pos_encoding))
        xp = namespace(embeds)
        rng = device_generator(random_generator(seed, generator), xp)
        embeds, input_ids, attention_mask = expand_inputs(max(gen.num_beams, gen.num_return_sequences), embeds,
                                                          xp.asarray(input_ids), xp.asarray(attention_mask))
        w = self.weights["language_model"]
        if text.is_encoder_decoder:
            decoder = t5.T5Decoding(w, text, embeds, attention_mask, gen.max_new_tokens, use_cache)
        else:
            decoder = opt.OPTDecoding(w, text, embeds, attention_mask, input_ids, gen.max_new_tokens, use_cache)
        return decoder, gen, rng

    def answer(self, image, question, max_new_tokens=30, **generate_kwargs):
        """`caption` with the question put in the prompt BLIP-2 answers, "Question: ... Answer:"
        (chat_prompt with no earlier turns): one image and question, or a list of each (or one
        question for all the images)."""
        several = isinstance(question, (list, tuple))
        prompts = [chat_prompt([], q) for q in (question if several else [question])]
        return self.caption(image, prompt=prompts if several else prompts[0], max_new_tokens=max_new_tokens,
                            **generate_kwargs)

    def trace(self, image, prompt=None):
        """{checkpoint path: NumPy array}: every intermediate of one forward pass on one image,
        attention probabilities included; see miniblip2/trace.py."""
        return trace(self, image, prompt)

    # The processor's inputs for `caption`/`stream`, and where the generated text starts: after
    # the prompt for OPT, which continues it; at once for T5, whose decoder writes only new text.
    def _caption_inputs(self, images, prompt):
        prompts = None if prompt is None else [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        inputs = self._need_processor()(images=images, text=prompts)
        if prompt is None:  # generate builds the image tokens + BOS itself
            input_ids = attention_mask = None
            prompt_length = self.config.num_query_tokens + 1
        else:
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
            prompt_length = input_ids.shape[1]
        return inputs["pixel_values"], input_ids, attention_mask, 0 if self.config.text.is_encoder_decoder else prompt_length

    # --- input checks: one clear error instead of a shape error deep inside NumPy ---------

    def _check_prompt(self, input_ids, attention_mask, pixel_values):
        input_ids = as_int_array(input_ids, "input_ids")
        B = input_ids.shape[0]
        attention_mask = np.ones_like(input_ids) if attention_mask is None else as_int_array(attention_mask, "attention_mask")
        if attention_mask.shape != input_ids.shape:
            raise PromptError(f"attention_mask {attention_mask.shape} must have the shape of input_ids {input_ids.shape}")
        check_mask(attention_mask)
        if B != self._check_pixels(pixel_values).shape[0]:
            raise PromptError(f"{B} prompts for {pixel_values.shape[0]} images: give one prompt per image")
        return self._check_ids(input_ids, "input_ids"), attention_mask

    def _check_ids(self, ids, name):
        ids = as_int_array(ids, name)
        vocab = self.config.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise PromptError(f"{name} must lie in [0, {vocab}); found {ids.min()}..{ids.max()}")
        return ids

    # OPT's learned positions end at max_position_embeddings; T5's relative positions never end.
    # Positions count real tokens, so the longest real row counts, not the padded width.
    def _check_length(self, attention_mask, max_new_tokens):
        if self.config.text.is_encoder_decoder:
            return
        prompt_length = int(attention_mask.sum(axis=1).max())
        limit = self.config.text.max_position_embeddings
        if prompt_length + max_new_tokens > limit:
            raise PromptError(
                f"the prompt is {prompt_length} tokens ({self.config.num_query_tokens} for the image) and "
                f"{max_new_tokens} new tokens were asked for: together more than the model's {limit} positions. "
                "Shorten the prompt or ask for fewer new tokens")


# How a checkpoint with a language model is read in `dtype`: the names its file may leave out
# (tied) or hold unused (ignored), and what stays float32 (float16 only, as in transformers).
# Flan-T5 in float16 is refused before anything is read.
def weight_rules(folder, config, dtype):  # -> tied, ignored, keep_float32
    if dtype == "float16" and config.text.is_encoder_decoder:
        raise CheckpointError(
            f"{folder}: BLIP-2 Flan-T5 cannot run in float16: T5 was trained in bfloat16 and its activations "
            "overflow float16's range (the BLIP-2 paper's checkpoints 'cannot be cast to float16'). "
            "Use dtype='bfloat16' (or 'float32')")
    ignored = [f"language_model.{name}" for name in language_model(config).IGNORED_WEIGHTS]
    return tied_weights(config), ignored, KEEP_IN_FLOAT32 if dtype == "float16" else ()


# Blip2ForConditionalGeneration.from_pretrained(path, dtype=...).to(device): config, processor
# files checked against it, weights checked against it (names, shapes, NaN and infinity unless
# check_finite=False) and converted to `dtype`, moved to `device` once ("cpu": NumPy, "cuda": CuPy).
def load(path, dtype="float32", progress=True, device="cpu", check_finite=True):
    folder = checkpoint_folder(path)
    config = read_config(folder)
    dtype = check_dtype(dtype)
    tied, ignored, keep = weight_rules(folder, config, dtype)
    check_tokenizer_present(folder, has_processor_files(folder))
    processor = load_processor(folder) if has_processor_files(folder) else None
    check_processor_fits(folder, processor, config.text.vocab_size, "text_config.vocab_size", config.num_query_tokens,
                         config.vision.image_size)
    weights = load_weights(folder, expected_shapes(config), tied, ignored, dtype, keep, device, progress, check_finite)
    return Blip2(config, weights, processor)
