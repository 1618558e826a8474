"""BLIP (transformers' modeling_blip.py): image captioning and visual question answering, from the
ViT of vision.py and the BERT text model of bert.py.

BlipForConditionalGeneration (Salesforce/blip-image-captioning-base, -large): `Blip`

image -> processor -> pixel_values [B, 3, 384, 384]
      -> vision_model -> image_embeds [B, 577, 768]: 1 CLS + 24 x 24 patches of 16 px
      -> text_decoder: [DEC] (and a prefix, "a photography of"), causal self-attention,
         cross-attention to image_embeds in every layer -> logits [B, T, 30524]
      -> greedy, beam search or sampling (generation/loops.py) up to [SEP] -> ids -> text

BlipForQuestionAnswering (Salesforce/blip-vqa-base, -capfilt-large): `BlipQuestionAnswering`

image -> vision_model -> image_embeds [B, 577, 768]
question -> processor -> [CLS] how many dogs ... ? [SEP] -> text_encoder: bidirectional,
         cross-attention to image_embeds -> question_embeds [B, L, 768]
      -> text_decoder from [DEC], cross-attention to question_embeds -> the answer, up to [SEP]

BLIP's matching models (BlipForImageTextRetrieval, BlipModel, BlipTextModel, BlipVisionModel)
are in blip_retrieval.py, on the same config and towers.

Speaks transformers' vocabulary (`forward`, `generate`, `batch_decode`, `processor(images=...,
text=...)`), with pixel_values first for both classes (transformers' VQA methods take input_ids
first; keyword calls are the same). `caption`, `answer` and `stream` take images and text.

What transformers 5.23 does that `generate` here does too, id for id:
- Captioning: the first prompt column ([CLS]) becomes [DEC] and the last column (the [SEP]) is
  dropped. In a right-padded batch (BlipProcessor pads on the right) the last column of a shorter
  prompt is padding: its [SEP] stays, the new tokens follow its padding, and their positions
  restart at 1 (GenerationMixin numbers them on from the padding's 0). `caption` pads on the
  left and puts [DEC] in each row itself, so every row is captioned as if alone.
- VQA: the decoder reads every position of the question's encoding, padding included: generate
  passes an all-ones mask, and the question's mask that forward passes is never applied
  (BlipTextAttention does not hand encoder_attention_mask on; no cross-attention is masked). A
  question padded in a batch can get another answer than alone; `answer` batches questions of
  one length together, so none is padded.
- With no prompt, generate starts from [DEC] alone; the decoder stops at [SEP] (102) and pads
  with 0, whatever eos/pad the text config names; generation_config.json is not read. (Here
  eos_token_id and pad_token_id may be given too; transformers' BLIP generate passes its own and
  raises TypeError for the caller's.)
- Ids are read as given: transformers' captioning generate also writes [DEC] into the caller's
  input_ids tensor (in place); miniblip2 leaves the caller's array alone.

Legend (blip-image-captioning-base): B batch, T text tokens, L question tokens, N image tokens
(577), E image width (768; 1024 for -large), D text width (768), V vocabulary (30524).
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .bert import (BlipDecoding, BlipTextConfig, context_kv, lm_head, lm_head_shapes, lm_head_tied_weights,
                   text_decoder, text_encoder, text_model_shapes)
from .checkpoint.config import check_activation, check_field, check_heads, from_dict, read_config_json
from .checkpoint.loading import check_processor_fits, check_tokenizer_present, checkpoint_folder, load_weights
from .checkpoint.processor import has_processor_files, load_blip_processor
from .errors import CheckpointError, PromptError
from .generation.loops import expand_inputs
from .generation.settings import TRANSFORMERS_DEFAULTS, random_generator, resolve_generation_config
from .glue import ImageToText, as_int_array, check_mask, prompt_list
from .nn import namespace
from .runtime.device import device_generator, to_numpy
from .runtime.precision import check_dtype, like_weight
from .runtime.trace import recording
from .vision import BlipVisionConfig, VisionConfig
from .vision import expected_shapes as vision_shapes


# BlipConfig: the ViT and the text model (captioning decoder, VQA encoder and decoder share one
# text_config), and the widths of the matching models' projections (blip_retrieval.py).
@dataclass(frozen=True)
class BlipConfig:
    vision: VisionConfig = field(default_factory=BlipVisionConfig)
    text: BlipTextConfig = field(default_factory=BlipTextConfig)
    projection_dim: int = 512  # BlipModel's visual_projection and text_projection
    image_text_hidden_size: int = 256  # BlipForImageTextRetrieval's vision_proj and text_proj


# BlipConfig.from_pretrained: both sub-configs, the text model's cross-attention as wide as the
# image (BlipConfig.__post_init__), and what generation needs from the text config. BlipModel
# alone can do without cross-attention (needs_cross_attention=False): its text is read alone.
def config_from_dict(values: dict, needs_cross_attention=True) -> BlipConfig:
    if not isinstance(values, dict) or values.get("model_type") != "blip":
        found = values.get("model_type") if isinstance(values, dict) else values
        raise CheckpointError(f"config.json has model_type {found!r}; this is the BLIP family's loader "
                              "(model_type 'blip', e.g. Salesforce/blip-image-captioning-base)")
    sections = {key: {} if values.get(key) is None else values[key] for key in ("vision_config", "text_config")}
    vision = from_dict(BlipVisionConfig, sections["vision_config"], "vision_config")
    text = from_dict(BlipTextConfig, sections["text_config"], "text_config")
    text = dataclasses.replace(text, encoder_hidden_size=vision.hidden_size)
    for where, tower in [("vision_config", vision), ("text_config", text)]:
        check_activation(f"{where}.hidden_act", tower.hidden_act)
        check_heads(where, tower.hidden_size, tower.num_attention_heads)
    if needs_cross_attention and not text.is_decoder:
        raise CheckpointError("config.json: text_config.is_decoder is false, so transformers builds BLIP's text "
                              "layers without cross-attention and the text model cannot read the image; fix or "
                              "re-download config.json")
    for key, role in [("bos_token_id", "starts every caption and answer"), ("sep_token_id", "ends them"),
                      ("pad_token_id", "pads them")]:
        if getattr(text, key) is None:
            raise CheckpointError(f"config.json: text_config.{key} is null, but BLIP's decoder needs it: it {role}; "
                                  "fix or re-download config.json")
    widths = {key: check_field(f"config.json: {key}", key, values.get(key, default), int)
              for key, default in [("projection_dim", 512), ("image_text_hidden_size", 256)]}
    return BlipConfig(vision=vision, text=text, **widths)


def read_config(folder, needs_cross_attention=True) -> BlipConfig:
    return config_from_dict(read_config_json(folder), needs_cross_attention)


def _prefixed(prefix, shapes):
    return {f"{prefix}.{name}": shape for name, shape in shapes.items()}


# The names a BLIP file may hold that no module uses: the position_ids buffers of the text
# embeddings (int64 [1, 512]; blip-vqa-base's safetensors and the 2022 pytorch_model.bin files).
IGNORED_WEIGHTS = ("text_encoder.embeddings.position_ids", "text_decoder.bert.embeddings.position_ids")
TIED_WEIGHTS = {f"text_decoder.{name}": f"text_decoder.{source}" for name, source in lm_head_tied_weights().items()}


class _BlipStages(ImageToText):
    """What both BLIP classes share: the ViT (glue.ImageModel), the text decoder, teacher-forced or
    generating, and the checks on prompts."""

    def __init__(self, config, weights, processor=None):
        super().__init__(config, weights, processor)
        self.xp = namespace(weights["vision_model"]["post_layernorm"]["weight"])  # numpy or cupy
        text = config.text
        # BlipForConditionalGeneration.generate / BlipForQuestionAnswering.generate pass these
        # two to the decoder's generate; everything else is transformers' default.
        self.generation_defaults = TRANSFORMERS_DEFAULTS | {"eos_token_id": text.sep_token_id,
                                                            "pad_token_id": text.pad_token_id}

    @staticmethod
    def check_config(config):  # what the class needs of a config beyond what config_from_dict checks
        pass

    @staticmethod
    def expected_shapes(config):  # every key of the checkpoint with its shape, from the config alone
        return {**_prefixed("vision_model", vision_shapes(config.vision)),
                **_prefixed("text_decoder.bert", text_model_shapes(config.text)),
                **_prefixed("text_decoder.cls", lm_head_shapes(config.text))}

    # BlipTextLMHeadModel.forward(input_ids, attention_mask, encoder_hidden_states=context):
    # positions 0..T-1, causal self-attention, every position's logits.
    def _decoder_logits(self, context, input_ids, attention_mask=None):  # ContextKV, [B, T], [B, T] -> [B, T, V]
        xp, w = self.xp, self.weights["text_decoder"]
        ids = xp.asarray(input_ids)
        mask = xp.ones(ids.shape, dtype=xp.int64) if attention_mask is None else xp.asarray(attention_mask)
        hidden = text_decoder(ids, xp.arange(ids.shape[1])[None], mask, context, w["bert"], self.config.text)
        return lm_head(hidden, w["cls"], self.config.text)

    # BlipTextLMHeadModel.generate(input_ids, attention_mask, encoder_hidden_states=...): the
    # settings resolved, every row repeated for its beams or samples (with the context's keys and
    # values, computed once per input), and the decoder for the loops.
    def _decoding(self, input_ids, attention_mask, context, seed, generator, use_cache, arguments):
        text, xp = self.config.text, self.xp
        gen = resolve_generation_config(self.generation_defaults, arguments, input_ids.shape[1],
                                        text.max_position_embeddings, text.vocab_size)
        if attention_mask is None:
            attention_mask = inferred_mask(input_ids, gen)
        self._check_length(attention_mask, gen.max_new_tokens)
        rng = device_generator(random_generator(seed, generator), xp)
        n = max(gen.num_beams, gen.num_return_sequences)
        input_ids, attention_mask = expand_inputs(n, xp.asarray(input_ids), xp.asarray(attention_mask))
        context = context.repeat(n) if n > 1 else context
        decoder = BlipDecoding(self.weights["text_decoder"], text, input_ids, attention_mask, context,
                               gen.max_new_tokens, use_cache)
        return decoder, gen, rng

    def _decoder_layers(self):
        return self.weights["text_decoder"]["bert"]["encoder"]["layer"]

    # A stage's input from outside (image or question embeddings) on the model's device, in the
    # dtype the text model computes in, as the previous module would have given it.
    def _activation(self, x):
        norm = self.weights["text_decoder"]["bert"]["embeddings"]["LayerNorm"]
        return like_weight(self.xp.asarray(x), norm["weight"])

    def trace(self, image, prompt=None):
        """{checkpoint path: NumPy array}: every intermediate of the forward pass generation starts
        with, on one image (and a prefix or question), attention probabilities included (`.probs`);
        see runtime/trace.py."""
        pixel_values, input_ids, attention_mask, _ = self._caption_inputs([image], None if prompt is None else [prompt])
        with recording(self) as records:
            self._trace_forward(pixel_values, input_ids, attention_mask)
        return {name: to_numpy(arrays[0]) for name, arrays in records.items()}

    # --- input checks: one clear error instead of a shape error deep inside NumPy ---------

    def _check_prompt(self, input_ids, attention_mask, pixel_values, name="input_ids"):
        ids = as_int_array(input_ids, name)
        mask = None if attention_mask is None else check_mask(as_int_array(attention_mask, "attention_mask"))
        if mask is not None and mask.shape != ids.shape:
            raise PromptError(f"attention_mask {mask.shape} must have the shape of {name} {ids.shape}")
        if ids.shape[0] != self._check_pixels(pixel_values).shape[0]:
            raise PromptError(f"{ids.shape[0]} rows of {name} for {pixel_values.shape[0]} images: give one per image")
        return self._check_ids(ids, name), mask

    def _check_ids(self, ids, name):
        ids = as_int_array(ids, name)
        vocab = self.config.text.vocab_size
        if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
            found = f"{ids.min()}..{ids.max()}" if ids.size else "no ids"
            raise PromptError(f"{name} must be non-empty ids in [0, {vocab}); found {found}")
        return ids

    # BLIP's learned positions end at max_position_embeddings (512); `generate` numbers a row's
    # real tokens, so the longest real row counts, not the padded width.
    def _check_length(self, attention_mask, max_new_tokens, what="the prompt"):
        length = int(attention_mask.sum(axis=1).max()) if attention_mask is not None else 0
        limit = self.config.text.max_position_embeddings
        if length + max_new_tokens > limit:
            raise PromptError(f"{what} is {length} tokens and {max_new_tokens} new tokens were asked for: together "
                              f"more than the model's {limit} positions. Shorten it or ask for fewer new tokens")


# GenerationMixin._prepare_attention_mask_for_generation, for ids given without a mask: padding
# is told by the pad id, unless the pad id is also an end id; else every id is real.
def inferred_mask(input_ids, gen):  # [B, T] -> [B, T]
    pad = gen.pad_token_id
    if np.any(input_ids == pad) and pad not in gen.eos_token_ids:
        return (input_ids != pad).astype(np.int64)
    return np.ones_like(input_ids)


class Blip(_BlipStages):
    """BlipForConditionalGeneration: captions, with or without a prefix to continue."""

    # --- the stages, each returning what the reference returns at that point -------------

    # BlipTextLMHeadModel on the image: the cross-attention keys and values of image_embeds, then
    # the decoder on input_ids as given (forward, unlike generate, keeps the [CLS]).
    def text_logits(self, image_embeds, input_ids, attention_mask=None):  # [B, N, E], [B, T] -> [B, T, V]
        image = context_kv(self._activation(image_embeds), self._decoder_layers(), self.config.text)
        return self._decoder_logits(image, input_ids, attention_mask)

    def forward(self, pixel_values, input_ids, attention_mask=None, interpolate_pos_encoding=False):
        """Logits as `BlipForConditionalGeneration(...).logits`: [B, T, V] for every position of
        input_ids as given ([CLS] is not swapped for [DEC] here; generate swaps it)."""
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
        self._check_length(np.ones_like(input_ids), 0, "input_ids")
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)
        return to_numpy(self.text_logits(image_embeds, input_ids, attention_mask))

    # BlipForConditionalGeneration.generate up to `text_decoder.generate`: no prompt is [DEC]
    # alone; a prompt's first column becomes [DEC] and its last column is dropped (see the module
    # docstring for what that does to right padding).
    def _prepare_generation(self, pixel_values, input_ids, attention_mask, seed, generator, use_cache,
                            interpolate_pos_encoding, arguments):
        bos = self.config.text.bos_token_id
        if input_ids is None:  # transformers builds [[DEC], [EOS]] per image and keeps [DEC]
            input_ids = np.full((self._check_pixels(pixel_values).shape[0], 1), bos, dtype=np.int64)
        else:
            input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
            if input_ids.shape[1] < 2:
                raise PromptError("input_ids need at least 2 columns: generate replaces the first ([CLS]) by [DEC] "
                                  "and drops the last ([SEP]). Make them with model.processor(text=...)")
            input_ids = np.concatenate([np.full_like(input_ids[:, :1], bos), input_ids[:, 1:-1]], axis=1)
            attention_mask = None if attention_mask is None else attention_mask[:, :-1]
        image = context_kv(self.vision(pixel_values, interpolate_pos_encoding), self._decoder_layers(),
                           self.config.text)
        return self._decoding(input_ids, attention_mask, image, seed, generator, use_cache, arguments)

    # The processor's arrays for caption/stream: each prefix as [DEC] prefix [SEP], padded on the
    # left, so that after generate drops the [SEP] column every row ends in its own last token and
    # its positions count from its own [DEC]. The new text starts after the prompt's columns.
    def _caption_inputs(self, images, prompts):
        processor = self._need_processor()
        if prompts is None:
            return processor(images=images)["pixel_values"], None, None, 1  # after [DEC]
        inputs = processor(images=images, text=prompts, padding_side="left")
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]  # [B, W]
        input_ids[np.arange(len(input_ids)), attention_mask.argmax(axis=1)] = self.config.text.bos_token_id
        return inputs["pixel_values"], input_ids, attention_mask, input_ids.shape[1] - 1

    def _trace_forward(self, pixel_values, input_ids, attention_mask):
        if input_ids is None:
            input_ids = np.full((pixel_values.shape[0], 1), self.config.text.bos_token_id, dtype=np.int64)
        else:  # what generate runs: the [SEP] column dropped
            input_ids, attention_mask = input_ids[:, :-1], attention_mask[:, :-1]
        self.forward(pixel_values, input_ids, attention_mask)

    # A captioning checkpoint was not trained to answer questions: say which checkpoints are.
    def answer(self, image, question, max_new_tokens=30, **generate_kwargs):
        raise CheckpointError("this checkpoint is a BlipForConditionalGeneration: it writes captions (caption(image), "
                              "or caption(image, prompt='a photography of') to continue a prefix) but was not trained "
                              "to answer questions; load a BlipForQuestionAnswering checkpoint "
                              "(Salesforce/blip-vqa-base or blip-vqa-capfilt-large) for answer")


class BlipQuestionAnswering(_BlipStages):
    """BlipForQuestionAnswering: answers a question about an image."""

    @staticmethod
    def expected_shapes(config):
        return _BlipStages.expected_shapes(config) | _prefixed("text_encoder", text_model_shapes(config.text))

    # The answer decoder reads the question's encoding (text width) through cross-attention
    # weights sized for the image (vision width): the model runs only where the two are equal (all
    # released VQA checkpoints: 768), and transformers fails at the first question otherwise.
    @staticmethod
    def check_config(config):
        if config.vision.hidden_size != config.text.hidden_size:
            raise CheckpointError(f"config.json: vision_config.hidden_size = {config.vision.hidden_size} but "
                                  f"text_config.hidden_size = {config.text.hidden_size}; BlipForQuestionAnswering's "
                                  "decoder reads the question's encoding with cross-attention weights as wide as the "
                                  "image, so the two must be equal (768 in blip-vqa-base); fix or re-download "
                                  "config.json")

    # --- the stages, each returning what the reference returns at that point -------------

    # BlipForQuestionAnswering's `text_encoder(input_ids, attention_mask, encoder_hidden_states=
    # image_embeds)`: the question reads itself and the image.
    def encode_question(self, image_embeds, input_ids, attention_mask=None):  # [B, N, E], [B, L] -> [B, L, D]
        xp = self.xp
        mask = None if attention_mask is None else xp.asarray(attention_mask)
        return text_encoder(xp.asarray(input_ids), mask, self._activation(image_embeds), self.weights["text_encoder"],
                            self.config.text)

    # BlipForQuestionAnswering.forward's `text_decoder(decoder_input_ids, ..., encoder_hidden_states=
    # question_embeds)`: the answer's logits, teacher-forced. Every question position is read
    # (the encoder_attention_mask forward also passes is never applied).
    def answer_logits(self, question_embeds, decoder_input_ids, decoder_attention_mask=None):  # [B, L, D] -> [B, S, V]
        question = context_kv(self._activation(question_embeds), self._decoder_layers(), self.config.text)
        return self._decoder_logits(question, decoder_input_ids, decoder_attention_mask)

    def forward(self, pixel_values, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None,
                interpolate_pos_encoding=False):
        """The answer decoder's logits [B, S, V] for decoder_input_ids, as BlipForQuestionAnswering's
        forward computes them (it returns only their loss): the question encoded with the image
        under its attention_mask, the decoder reading every position of that encoding."""
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
        decoder_input_ids, decoder_attention_mask = self._check_prompt(decoder_input_ids, decoder_attention_mask,
                                                                       pixel_values, "decoder_input_ids")
        for ids, what in [(input_ids, "input_ids"), (decoder_input_ids, "decoder_input_ids")]:
            self._check_length(np.ones_like(ids), 0, what)
        question = self.encode_question(self.vision(pixel_values, interpolate_pos_encoding), input_ids, attention_mask)
        return to_numpy(self.answer_logits(question, decoder_input_ids, decoder_attention_mask))

    # BlipForQuestionAnswering.generate up to `text_decoder.generate`: the question encoded with the
    # image, then the decoder from [DEC], reading every question position.
    def _prepare_generation(self, pixel_values, input_ids, attention_mask, seed, generator, use_cache,
                            interpolate_pos_encoding, arguments):
        if input_ids is None:
            raise PromptError("BLIP's VQA generate needs the question: input_ids (and attention_mask) from "
                              "model.processor(images=..., text=question)")
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, pixel_values)
        self._check_length(np.ones_like(input_ids), 0, "the question")
        question = self.encode_question(self.vision(pixel_values, interpolate_pos_encoding), input_ids, attention_mask)
        start = np.full((input_ids.shape[0], 1), self.config.text.bos_token_id, dtype=np.int64)  # [B, 1]: [DEC]
        return self._decoding(start, None, context_kv(question, self._decoder_layers(), self.config.text),
                              seed, generator, use_cache, arguments)

    # The processor's arrays for answer/stream: the question as BlipProcessor gives it; the answer
    # starts after [DEC].
    def _caption_inputs(self, images, prompts):
        if prompts is None:
            raise PromptError("a VQA model needs a question: answer(image, question)")
        inputs = self._need_processor()(images=images, text=prompts)
        return inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], 1

    def _trace_forward(self, pixel_values, input_ids, attention_mask):
        start = np.full((input_ids.shape[0], 1), self.config.text.bos_token_id, dtype=np.int64)
        self.forward(pixel_values, input_ids, start, attention_mask)

    def answer(self, image, question, max_new_tokens=30, **generate_kwargs):
        """The answer to `question` about one image (a str), or to one question per image (lists,
        or one str for all). Takes `generate`'s arguments. Questions of one length are answered
        in one batch: transformers' VQA decoder would read a shorter question's padding."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        questions = prompt_list(question, len(images))
        if questions is None:
            raise PromptError("answer needs a question: answer(image, 'how many dogs are there?')")
        if len(questions) != len(images):
            raise PromptError(f"{len(images)} images but {len(questions)} questions; give one question per image "
                              "(or one str for all of them)")
        lengths = [len(self._need_processor().tokenizer.encode(q)) for q in questions]
        answers = [None] * len(images)
        for length in dict.fromkeys(lengths):
            rows = [i for i, n in enumerate(lengths) if n == length]
            texts = self._texts([images[i] for i in rows], [questions[i] for i in rows], max_new_tokens,
                                generate_kwargs)
            for i, text in zip(rows, texts):
                answers[i] = text
        return answers[0] if single else answers

    # A VQA checkpoint writes answers, not captions.
    def caption(self, image, prompt=None, max_new_tokens=30, **generate_kwargs):
        raise CheckpointError("this checkpoint is a BlipForQuestionAnswering: it answers questions "
                              "(answer(image, question)) but does not caption; load a BlipForConditionalGeneration "
                              "checkpoint (Salesforce/blip-image-captioning-base or -large) for caption")


# BlipFor...from_pretrained(path, dtype=...).to(device): config, processor files checked against
# it, weights checked against it (names, shapes; NaN and infinity unless check_finite=False) and
# converted to `dtype`, moved to `device` once ("cpu": NumPy, "cuda": CuPy). No module is kept
# in float32: BLIP has no _keep_in_fp32_modules.
def _load(cls, path, dtype, progress, device, check_finite):
    folder = checkpoint_folder(path)
    config = read_config(folder)
    cls.check_config(config)
    dtype = check_dtype(dtype)
    check_tokenizer_present(folder, has_processor_files(folder))
    processor = load_blip_processor(folder) if has_processor_files(folder) else None
    check_processor_fits(folder, processor, config.text.vocab_size, "text_config.vocab_size", 0,
                         config.vision.image_size)
    weights = load_weights(folder, cls.expected_shapes(config), TIED_WEIGHTS, IGNORED_WEIGHTS, dtype, (), device,
                           progress, check_finite)
    return cls(config, weights, processor)


def load_captioning(path, dtype="float32", progress=True, device="cpu", check_finite=True) -> Blip:
    return _load(Blip, path, dtype, progress, device, check_finite)


def load_question_answering(path, dtype="float32", progress=True, device="cpu",
                            check_finite=True) -> BlipQuestionAnswering:
    return _load(BlipQuestionAnswering, path, dtype, progress, device, check_finite)
