"""The glue: a checkpoint folder in, a `Blip2` model out that turns images into text.

image -> processor -> pixel_values [B, 3, 224, 224]
      -> vision_model -> image_embeds [B, 257, 1408]
      -> qformer (32 queries) -> query_output [B, 32, 768]
      -> language_projection -> image features [B, 32, 2560], put at the 32 `<image>` positions
      -> OPT -> logits [B, T, 50304] -> greedy, beam search or sampling -> ids -> text

Mirrors `Blip2ForConditionalGeneration` (transformers' modeling_blip_2.py) and speaks its
vocabulary: `forward`, `generate`, `batch_decode`, `processor(images=..., text=...)`.
The weights live on one device (`load(..., device="cpu" | "cuda")`, see device.py) in one dtype
(float32, float16 or bfloat16, see precision.py). Inputs follow the weights; `forward` and
`generate` give NumPy back. The stages (`vision`, `qformer`, `project`) take and give arrays on
the model's device, so they chain there without copies.

Legend: B batch, T tokens, Q queries (32), Dq Q-Former width (768), D text width (2560).
"""

from pathlib import Path

import numpy as np

from .checkpoint.config import read_config
from .checkpoint.processor import load_processor
from .checkpoint.safetensors import check_weights, load_checkpoint, nest
from .errors import CheckpointError, ImageError, PromptError
from .generation.loops import beam_search, expand_inputs, sample_steps
from .generation.settings import generation_defaults, random_generator, resolve_generation_config
from .generation.streaming import TextStreamer
from .nn import linear, namespace
from .opt import embed_tokens, lm_head, opt_decoder
from .qformer import qformer_model
from .runtime.device import array_module, device_generator, to_device, to_numpy
from .runtime.precision import cast_weights, check_dtype, like_weight, widen
from .runtime.trace import record, trace
from .vision import vision_model


def _linear(prefix, n_out, n_in, bias=True):
    shapes = {f"{prefix}.weight": (n_out, n_in)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _norm(prefix, n):
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _vision_shapes(c):
    D, F, P = c.hidden_size, c.intermediate_size, c.patch_size
    shapes = {"embeddings.class_embedding": (1, 1, D),
              "embeddings.position_embedding": (1, (c.image_size // P) ** 2 + 1, D),
              **_linear("embeddings.patch_embedding", D, c.num_channels, bias=True),
              **_norm("post_layernorm", D)}
    shapes["embeddings.patch_embedding.weight"] = (D, c.num_channels, P, P)
    for i in range(c.num_hidden_layers):
        layer = f"encoder.layers.{i}"
        shapes |= {**_norm(f"{layer}.layer_norm1", D), **_norm(f"{layer}.layer_norm2", D),
                   **_linear(f"{layer}.self_attn.qkv", 3 * D, D, bias=c.qkv_bias),
                   **_linear(f"{layer}.self_attn.projection", D, D),
                   **_linear(f"{layer}.mlp.fc1", F, D), **_linear(f"{layer}.mlp.fc2", D, F)}
    return shapes


def _qformer_attention_shapes(prefix, D, context_width):
    return {**_linear(f"{prefix}.attention.query", D, D),
            **_linear(f"{prefix}.attention.key", D, context_width),
            **_linear(f"{prefix}.attention.value", D, context_width),
            **_linear(f"{prefix}.output.dense", D, D), **_norm(f"{prefix}.output.LayerNorm", D)}


def _qformer_shapes(c):
    D, F = c.hidden_size, c.intermediate_size
    shapes = _norm("layernorm", D)
    for i in range(c.num_hidden_layers):
        layer = f"encoder.layer.{i}"
        shapes |= _qformer_attention_shapes(f"{layer}.attention", D, D)
        if i % c.cross_attention_frequency == 0:
            shapes |= _qformer_attention_shapes(f"{layer}.crossattention", D, c.encoder_hidden_size)
        shapes |= {**_linear(f"{layer}.intermediate_query.dense", F, D),
                   **_linear(f"{layer}.output_query.dense", D, F), **_norm(f"{layer}.output_query.LayerNorm", D)}
    return shapes


def _opt_shapes(c):
    D, F = c.hidden_size, c.ffn_dim
    shapes = {"model.decoder.embed_tokens.weight": (c.vocab_size, D),
              "model.decoder.embed_positions.weight": (c.max_position_embeddings + 2, D),
              **_norm("model.decoder.final_layer_norm", D), "lm_head.weight": (c.vocab_size, D)}
    for i in range(c.num_hidden_layers):
        layer = f"model.decoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= _linear(f"{layer}.self_attn.{name}", D, D)
        shapes |= {**_norm(f"{layer}.self_attn_layer_norm", D), **_norm(f"{layer}.final_layer_norm", D),
                   **_linear(f"{layer}.fc1", F, D), **_linear(f"{layer}.fc2", D, F)}
    return shapes


# Every key of a Blip2ForConditionalGeneration checkpoint with its shape, from the config alone.
def expected_shapes(config):
    prefixed = lambda prefix, shapes: {f"{prefix}.{k}": v for k, v in shapes.items()}
    return {"query_tokens": (1, config.num_query_tokens, config.qformer.hidden_size),
            **prefixed("vision_model", _vision_shapes(config.vision)),
            **prefixed("qformer", _qformer_shapes(config.qformer)),
            **_linear("language_projection", config.text.hidden_size, config.qformer.hidden_size),
            **prefixed("language_model", _opt_shapes(config.text))}


TIED_WEIGHTS = {"language_model.lm_head.weight": "language_model.model.decoder.embed_tokens.weight"}


def _as_int_array(values, name):
    array = to_numpy(values)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise PromptError(f"{name} must be a 2-D integer array [batch, tokens]; got {array.dtype} {array.shape}")
    return array.astype(np.int64)


class Blip2:
    """A loaded BLIP-2 model: config, nested weights, processor, generation defaults."""

    def __init__(self, config, weights, processor=None):
        self.config = config
        self.weights = weights
        self.processor = processor
        self.generation_defaults = generation_defaults(config)
        self.xp = namespace(weights["query_tokens"])  # numpy or cupy: where the weights live

    # --- the stages, each returning what the reference returns at that point -------------

    def vision(self, pixel_values, interpolate_pos_encoding=False):  # [B, 3, H, W] -> [B, 257, 1408]
        w = self.weights["vision_model"]
        # pixel_values.to(patch_embedding.weight.dtype), on the weights' device
        pixel_values = like_weight(self.xp.asarray(self._check_pixels(pixel_values)),
                                   w["embeddings"]["patch_embedding"]["weight"])
        return vision_model(pixel_values, w, self.config.vision, interpolate_pos_encoding)

    # In float16 the Q-Former is float32 (transformers' _keep_in_fp32_modules): the image
    # embeddings are cast up to its dtype here, and its output back down in `project`.
    def qformer(self, image_embeds):  # [B, 257, 1408] -> [B, 32, 768]
        w = self.weights["qformer"]
        image_embeds = like_weight(self.xp.asarray(image_embeds), w["layernorm"]["weight"])
        return qformer_model(widen(self.weights["query_tokens"]), image_embeds, w, self.config.qformer)

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
        embeds = embed_tokens(xp.asarray(input_ids), self.weights["language_model"])
        embeds[xp.asarray(is_image)] = image_features.reshape(-1, image_features.shape[-1])
        return embeds

    def forward(self, pixel_values, input_ids, attention_mask=None, interpolate_pos_encoding=False):
        """Logits [B, T, V] for every prompt position, as `Blip2ForConditionalGeneration(...).logits`."""
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
        self._check_length(input_ids.shape[1], 0)
        features = self.image_features(pixel_values, interpolate_pos_encoding)
        embeds = self.embed_inputs(input_ids, features)
        w = self.weights["language_model"]
        hidden = opt_decoder(embeds, self.xp.asarray(attention_mask), w, self.config.text)
        return to_numpy(lm_head(hidden, w))

    def generate(self, pixel_values, input_ids=None, attention_mask=None, max_new_tokens=None, *, seed=None,
                 generator=None, streamer=None, use_cache=True, interpolate_pos_encoding=False, **generation_kwargs):
        """Prompt ids followed by the new ids, laid out as `Blip2ForConditionalGeneration.generate`.

        Takes transformers' names: max_new_tokens, max_length, min_new_tokens, min_length,
        do_sample, num_beams, num_return_sequences, temperature, top_k, top_p, repetition_penalty,
        no_repeat_ngram_size, length_penalty, early_stopping (True, False, "never"), eos_token_id
        (an id or a list), pad_token_id. Unset ones take transformers' defaults (greedy, 20 new
        tokens, top_k 50) with the text config's eos and pad; like transformers 5.23, the settings
        in generation_config.json are not read.

        Sampling draws from `generator` (a np.random.Generator) or from a new one seeded with
        `seed`: reproducible, from the distribution transformers samples, but never the very ids
        torch's random stream would give. `streamer` is called as transformers calls one:
        put(prompt ids [1, T]), put(new id [1]) after each step, end(); see `TextStreamer`.
        With num_return_sequences n, each input's n rows come together, best beam first."""
        embeds, input_ids, attention_mask, gen, rng = self._prepare_generation(
            pixel_values, input_ids, attention_mask, seed, generator, interpolate_pos_encoding,
            dict(max_new_tokens=max_new_tokens, **generation_kwargs))
        w, text_config = self.weights["language_model"], self.config.text
        if gen.num_beams > 1:
            if streamer is not None:
                raise PromptError("`streamer` cannot be used with beam search (as in transformers): the text is "
                                  "known only at the end. Set num_beams=1")
            return to_numpy(beam_search(embeds, input_ids, attention_mask, w, text_config, gen, rng, use_cache))
        ids = [to_numpy(input_ids)]
        if streamer is not None:
            streamer.put(ids[0])
        for next_ids in sample_steps(embeds, input_ids, attention_mask, w, text_config, gen, rng, use_cache):
            ids.append(next_ids[:, None])  # NumPy: each step's ids come to the host anyway
            if streamer is not None:
                streamer.put(next_ids)
        if streamer is not None:
            streamer.end()
        return np.concatenate(ids, axis=1)

    # Blip2ForConditionalGeneration.generate up to `language_model.generate`: the inputs checked,
    # the settings resolved, the image features put into the prompt's embeddings, and every row
    # repeated for its beams or samples (GenerationMixin._expand_inputs_for_generation).
    def _prepare_generation(self, pixel_values, input_ids, attention_mask, seed, generator,
                            interpolate_pos_encoding, arguments):
        batch = self._check_pixels(pixel_values).shape[0]
        if input_ids is None:  # no prompt: the image tokens and BOS, as the reference builds them
            start = [self.config.image_token_index] * self.config.num_query_tokens + [self.config.text.bos_token_id]
            input_ids = np.full((batch, len(start)), start, dtype=np.int64)
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
        text = self.config.text
        gen = resolve_generation_config(self.generation_defaults, arguments, input_ids.shape[1],
                                        text.max_position_embeddings, text.vocab_size)
        self._check_length(input_ids.shape[1], gen.max_new_tokens)
        embeds = self.embed_inputs(input_ids, self.image_features(pixel_values, interpolate_pos_encoding))
        xp = namespace(embeds)
        rng = device_generator(random_generator(seed, generator), xp)
        rows = expand_inputs(max(gen.num_beams, gen.num_return_sequences), embeds, xp.asarray(input_ids),
                             xp.asarray(attention_mask))
        return (*rows, gen, rng)

    def trace(self, image, prompt=None):
        """{checkpoint path: NumPy array}: every intermediate of one forward pass on one image,
        attention probabilities included; see miniblip2/trace.py."""
        return trace(self, image, prompt)

    def batch_decode(self, ids, skip_special_tokens=True):
        return self._need_processor().tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def caption(self, image, prompt=None, max_new_tokens=30, **generate_kwargs):
        """The generated text for one image (a str) or for a list of images (a list of str).

        With a prompt ("Question: ... Answer:", see `chat_prompt`) only the continuation is
        returned; `generate` and `batch_decode` give the prompt and the continuation together, as
        transformers does. Takes `generate`'s arguments; with num_return_sequences n > 1 each
        image gives a list of n texts instead of one."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        pixel_values, input_ids, attention_mask, prompt_length = self._caption_inputs(images, prompt)
        ids = self.generate(pixel_values, input_ids, attention_mask, max_new_tokens=max_new_tokens, **generate_kwargs)
        texts = [text.strip() for text in self.batch_decode(ids[:, prompt_length:])]  # the answer, not the prompt
        n = len(texts) // len(images)  # num_return_sequences
        per_image = texts if n == 1 else [texts[i * n:(i + 1) * n] for i in range(len(images))]
        return per_image[0] if single else per_image

    def stream(self, image, prompt=None, max_new_tokens=30, *, seed=None, generator=None, use_cache=True,
               interpolate_pos_encoding=False, **generation_kwargs):
        """Yield the caption of one image in pieces as the tokens come: "".join of the pieces is
        `caption(image, prompt, ...)` with the same arguments. Greedy or sampling (a beam search
        knows its text only at the end). A piece never ends inside a character or in text that a
        later token could still change (see `TextStreamer`)."""
        if isinstance(image, (list, tuple)):
            raise PromptError("stream takes one image; use caption for a list of images")
        pixel_values, input_ids, attention_mask, _ = self._caption_inputs([image], prompt)
        embeds, input_ids, attention_mask, gen, rng = self._prepare_generation(
            pixel_values, input_ids, attention_mask, seed, generator, interpolate_pos_encoding,
            dict(max_new_tokens=max_new_tokens, **generation_kwargs))
        if gen.num_beams > 1 or gen.num_return_sequences > 1:
            raise PromptError("stream gives one text by greedy search or sampling: set num_beams=1 and "
                              "num_return_sequences=1 (use caption for beam search)")
        streamer = TextStreamer(self._need_processor().tokenizer)
        streamer.put(to_numpy(input_ids))
        w, text_config = self.weights["language_model"], self.config.text
        for next_ids in sample_steps(embeds, input_ids, attention_mask, w, text_config, gen, rng, use_cache):
            if piece := streamer.put(next_ids):
                yield piece
        if piece := streamer.end():
            yield piece

    # The processor's inputs for `caption`/`stream`, and where the generated text starts.
    def _caption_inputs(self, images, prompt):
        prompts = None if prompt is None else [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        inputs = self._need_processor()(images=images, text=prompts)
        if prompt is None:  # generate builds the image tokens + BOS itself
            return inputs["pixel_values"], None, None, self.config.num_query_tokens + 1
        return inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], inputs["input_ids"].shape[1]

    # --- input checks: one clear error instead of a shape error deep inside NumPy ---------

    def _need_processor(self):
        if self.processor is None:
            raise CheckpointError("this model was loaded without tokenizer/preprocessor files; "
                                  "put them in the checkpoint folder (see weights/README.md)")
        return self.processor

    def _check_pixels(self, pixel_values):
        if not hasattr(pixel_values, "shape") or len(pixel_values.shape) != 4 or pixel_values.shape[1] != 3:
            shape = getattr(pixel_values, "shape", type(pixel_values).__name__)
            raise ImageError(f"pixel_values must be a [batch, 3, height, width] array; got {shape}. "
                             "Use model.processor(images=...) to make it from images")
        return pixel_values

    def _check_prompt(self, input_ids, attention_mask, pixel_values):
        input_ids = _as_int_array(input_ids, "input_ids")
        B = input_ids.shape[0]
        attention_mask = np.ones_like(input_ids) if attention_mask is None else _as_int_array(attention_mask, "attention_mask")
        if attention_mask.shape != input_ids.shape:
            raise PromptError(f"attention_mask {attention_mask.shape} must have the shape of input_ids {input_ids.shape}")
        if B != self._check_pixels(pixel_values).shape[0]:
            raise PromptError(f"{B} prompts for {pixel_values.shape[0]} images: give one prompt per image")
        vocab = self.config.text.vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise PromptError(f"input_ids must lie in [0, {vocab}); found {input_ids.min()}..{input_ids.max()}")
        return input_ids, attention_mask

    def _check_length(self, prompt_length, max_new_tokens):
        limit = self.config.text.max_position_embeddings
        if prompt_length + max_new_tokens > limit:
            raise PromptError(
                f"the prompt is {prompt_length} tokens ({self.config.num_query_tokens} for the image) and "
                f"{max_new_tokens} new tokens were asked for: together more than the model's {limit} positions. "
                "Shorten the prompt or ask for fewer new tokens")


# Blip2ForConditionalGeneration.from_pretrained(path, dtype=...).to(device): config, weights
# checked against it and converted to `dtype` (the Q-Former kept float32 for float16, as
# transformers keeps it), moved to `device` once ("cpu": NumPy, "cuda": CuPy), processor.
def load(path, dtype="float32", progress=True, device="cpu"):
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give the folder of a BLIP-2 checkpoint "
                              "(config.json, *.safetensors, tokenizer files); see weights/README.md")
    dtype = check_dtype(dtype)
    xp = array_module(device)  # before reading 15 GB: a missing CuPy or GPU fails at once
    config = read_config(folder)
    if dtype == "float32":  # F32 files stay zero-copy memory maps
        flat = load_checkpoint(folder, dtype=np.float32, progress=progress)
    else:
        flat = cast_weights(load_checkpoint(folder, dtype=None, progress=progress), dtype)
    flat = check_weights(flat, expected_shapes(config), tied=TIED_WEIGHTS)
    processor = load_processor(folder) if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file() else None
    weights = nest(flat) if device == "cpu" else to_device(nest(flat), xp)
    return Blip2(config, weights, processor)
