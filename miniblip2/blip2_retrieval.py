"""BLIP-2's first stage: the ViT and the Q-Former trained to match images and texts
(Salesforce/blip2-itm-vit-g, -coco), and the classes transformers builds on it (modeling_blip_2.py):

    Blip2ForImageTextRetrieval       Blip2Retrieval    forward -> ITM or ITC scores; match, similarity
    Blip2TextModelWithProjection     Blip2TextWithProjection    forward -> text_embeds [B, L, 256]
    Blip2VisionModelWithProjection   Blip2VisionWithProjection  forward -> image_embeds [B, 32, 256]
    Blip2Model                       Blip2Features     get_image_features, get_qformer_features,
                                                       get_text_features

image -> vision_model -> [B, 257, 1408] -> Q-Former, 32 queries -> query output [B, 32, 768]
text  -> embeddings (word + position) -> Q-Former, text alone  -> text output [B, L, 768]

ITC, image-text contrastive (the default head): each query output through `vision_projection`
and the text's first token ([CLS]) through `text_projection`, both scaled to unit length: 32
cosines per (image, text), the largest kept -> logits_per_image [images, texts]. No temperature.
ITM, image-text matching: queries and text in one Q-Former pass, the queries also reading the
image (cross-attention); `itm_head` on each query row, averaged -> [B, 2]: (no match, match)
for the B image-text pairs.

In float16 the Q-Former and query tokens stay float32 (transformers' _keep_in_fp32_modules); the
text embeddings do not, so in matching the query tokens are rounded to float16 when they are put
beside the text, and everything goes back up to float32 in the Q-Former.

Legend: B batch, I images, N texts, Q queries (32), L text tokens, T image tokens (257),
E image width (1408), Dq Q-Former width (768), C embedding width (image_text_hidden_size, 256).
"""

import functools
from dataclasses import dataclass, field

import numpy as np

from . import blip2, opt, t5
from .bert import text_embeddings
from .blip2 import Blip2Stages, glue_value, image_tower_configs, section
from .checkpoint.config import check_field, read_config_json
from .checkpoint.loading import check_processor_fits, check_tokenizer_present, checkpoint_folder, load_weights
from .checkpoint.processor import has_processor_files, load_processor, load_retrieval_processor
from .errors import CheckpointError, ImageError, PromptError
from .glue import as_int_array, check_mask
from .nn import layer_norm, linear, linear_shapes, softmax
from .qformer import QFormerConfig, qformer_model, text_embedding_shapes
from .qformer import expected_shapes as qformer_shapes
from .retrieval import check_text_lengths, l2_normalize, text_list
from .runtime.device import to_numpy
from .runtime.precision import check_dtype, like_weight, matmul, widen
from .runtime.trace import record
from .vision import VisionConfig
from .vision import expected_shapes as vision_shapes


# Blip2Config as the first-stage classes read it: no language model (its text_config is an
# unused default), the width of the contrastive embeddings, and whether input ids start with
# `num_query_tokens` image placeholders (image_token_index; blip2-itm-vit-g has none).
@dataclass(frozen=True)
class RetrievalConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None


# Blip2Config.from_dict for these classes. The ones that read text need the Q-Former's text
# feed-forward (use_qformer_text_input); the first hub revision spelt that key differently.
def config_from_dict(values: dict, needs_text_input=True) -> RetrievalConfig:
    if not isinstance(values, dict) or values.get("model_type") != "blip-2":
        found = values.get("model_type") if isinstance(values, dict) else values
        raise CheckpointError(
            f"config.json has model_type {found!r}; BLIP-2's retrieval and feature models "
            "have 'blip-2' (old revisions said 'blip-2-without-lm': download the current config.json)")
    vision, qformer = image_tower_configs(values)
    if needs_text_input and not qformer.use_qformer_text_input:
        old = " (this config has the old key `qformer_text_input`, which transformers ignores)" if (
            "qformer_text_input" in section(values, "qformer_config")) else ""
        raise CheckpointError(
            f"config.json: qformer_config.use_qformer_text_input is false{old}, so the Q-Former has no "
            "feed-forward weights for text and cannot read it. Download the current config.json of the checkpoint")
    image_token = values.get("image_token_index", values.get("image_token_id"))
    return RetrievalConfig(vision=vision, qformer=qformer,
                           num_query_tokens=glue_value(values, "num_query_tokens", int, 32),
                           image_text_hidden_size=glue_value(values, "image_text_hidden_size", int, 256),
                           image_token_index=check_field("config.json: image_token_index", "image_token_index",
                                                         image_token, int | None))


def _prefixed(prefix, shapes):
    return {f"{prefix}.{name}": shape for name, shape in shapes.items()}


# --- input checks: one clear error, naming the argument, before any product ---------------

def _int_rows(values, name):  # [texts, tokens] ids or mask, int64 on the host
    return as_int_array(values, name, rows="texts", least="text")


class _Blip2QFormerStages(Blip2Stages):
    """blip2.Blip2Stages (the ViT, the Q-Former's query path) plus the Q-Former's text path and
    the projections into the shared embedding space."""

    # Blip2TextEmbeddings, then the Q-Former on the text alone (query_length=0): no image, and the
    # text's own feed-forward weights.
    def text_output(self, input_ids, attention_mask=None):  # [N, L] -> [N, L, 768]
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        w = self.weights["qformer"]
        embeds = text_embeddings(self.xp.asarray(input_ids), self.weights["embeddings"])  # [N, L, 768]
        embeds = like_weight(embeds, w["layernorm"]["weight"])
        return qformer_model(embeds, None, w, self.config.qformer, self.xp.asarray(attention_mask), query_length=0)

    # Q-Former outputs go through a head in the head's dtype (`.to(head.weight.dtype)`), then are
    # projected and scaled to unit length: vision_projection for queries, text_projection for text.
    def project(self, hidden, head):  # [..., 768] -> [..., 256]
        w = self.weights[head]
        return record(w, l2_normalize(linear(like_weight(hidden, w["weight"]), w), w["weight"]))

    def _check_text(self, input_ids, attention_mask, name="input_ids"):
        input_ids = _int_rows(input_ids, name)
        mask = np.ones_like(input_ids) if attention_mask is None else _int_rows(attention_mask, "attention_mask")
        if mask.shape != input_ids.shape:
            raise PromptError(f"attention_mask {mask.shape} must have the shape of {name} {input_ids.shape}")
        check_mask(mask)
        vocab, positions = self.config.qformer.vocab_size, self.config.qformer.max_position_embeddings
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise PromptError(f"{name} must lie in [0, {vocab}), the Q-Former's vocabulary; found "
                              f"{input_ids.min()}..{input_ids.max()}. Tokenize with model.processor")
        if input_ids.shape[1] > positions:
            raise PromptError(f"{name} has {input_ids.shape[1]} tokens per text, more than the Q-Former's "
                              f"{positions} positions (qformer_config.max_position_embeddings); shorten the text")
        return input_ids, mask


@dataclass(frozen=True)
class ImageTextMatchingOutput:
    """Blip2ImageTextMatchingModelOutput's arrays, as NumPy.

    ITM: logits_per_image [B, 2] (no match, match), logits_per_text its transpose [2, B],
         text_embeds the Q-Former output [B, 32 + L, 768], image_embeds the ViT's [B, 257, 1408].
    ITC: logits_per_image [I, N] cosines, logits_per_text [N, I], text_embeds [N, 256],
         image_embeds [I, 32, 256]."""
    logits_per_image: np.ndarray
    logits_per_text: np.ndarray
    text_embeds: np.ndarray
    image_embeds: np.ndarray


class Blip2Retrieval(_Blip2QFormerStages):
    """Blip2ForImageTextRetrieval: does a text describe an image? (Salesforce/blip2-itm-vit-g)"""

    @staticmethod
    def expected_shapes(config):
        c = config.qformer
        return {"query_tokens": (1, config.num_query_tokens, c.hidden_size),
                **_prefixed("vision_model", vision_shapes(config.vision)),
                **_prefixed("embeddings", text_embedding_shapes(c)),
                **_prefixed("qformer", qformer_shapes(c)),
                **linear_shapes("vision_projection", config.image_text_hidden_size, c.hidden_size),
                **linear_shapes("text_projection", config.image_text_hidden_size, c.hidden_size),
                **linear_shapes("itm_head", 2, c.hidden_size)}

    # Blip2TextEmbeddings(input_ids, query_embeds=query_tokens), then the Q-Former with
    # query_length=32: one self-attention over queries and text, cross-attention for the queries.
    # The query tokens are put beside the text in the embeddings' dtype (float16 even though the
    # Q-Former keeps them float32), then all rows go up to the Q-Former's dtype.
    def matching_output(self, image_embeds, input_ids, attention_mask):  # [B, T, E], [B, L], [B, Q+L] -> [B, Q+L, 768]
        w, xp = self.weights["qformer"], self.xp
        table = self.weights["embeddings"]
        text = text_embeddings(xp.asarray(input_ids), table)  # [B, L, 768]
        queries = like_weight(widen(self.weights["query_tokens"]), table["word_embeddings"]["weight"])  # [1, Q, 768]
        queries = xp.broadcast_to(queries, (text.shape[0], *queries.shape[1:]))  # [B, Q, 768]
        embeds = like_weight(xp.concat([queries, text], axis=1), w["layernorm"]["weight"])  # [B, Q + L, 768]
        image_embeds = like_weight(xp.asarray(image_embeds), w["layernorm"]["weight"])
        return qformer_model(embeds, image_embeds, w, self.config.qformer, xp.asarray(attention_mask),
                             query_length=self.config.num_query_tokens)

    # itm_head on each query row, then the mean over the 32 queries (the text rows are not read).
    def itm_logits(self, matching_output):  # [B, Q + L, 768] -> [B, 2]
        w, xp = self.weights["itm_head"], self.xp
        rows = like_weight(matching_output[:, :self.config.num_query_tokens], w["weight"])  # [B, Q, 768]
        return like_weight(xp.mean(linear(rows, w), axis=1), w["weight"])  # [B, 2]

    # The best of the 32 query embeddings for each text: cosines, as both are unit length.
    def itc_logits(self, image_embeds, text_embeds):  # [I, Q, C], [N, C] -> [I, N]
        xp = self.xp
        cosines = matmul(image_embeds, text_embeds.T)  # [I, Q, N]
        return like_weight(xp.max(cosines, axis=1), self.weights["text_projection"]["weight"])

    # The ids (and mask) each head reads. With image_token_index set, the processor put 32
    # placeholder ids in front of every text: both heads drop them; ITM keeps their mask entries
    # (ones) for the 32 query rows. Without it, ITM puts ones in front of the text's mask.
    def _text_for_head(self, input_ids, attention_mask, matching):  # [B, (Q +) L] -> [B, L], [B, (Q +) L]
        Q, image_token = self.config.num_query_tokens, self.config.image_token_index
        if image_token is None:
            input_ids, attention_mask = self._check_text(input_ids, attention_mask)
            if matching:
                query_mask = np.ones((len(attention_mask), Q), dtype=np.int64)  # [B, Q]
                attention_mask = np.concatenate([query_mask, attention_mask], axis=1)  # [B, Q + L]
            return input_ids, attention_mask
        ids = _int_rows(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _int_rows(attention_mask, "attention_mask")
        if ids.shape[1] <= Q or not np.all(ids[:, :Q] == image_token):
            raise PromptError(f"input_ids must start with the {Q} image placeholders (id {image_token}, "
                              "config.json image_token_index) and then the text; build them with model.processor")
        text_ids, text_mask = self._check_text(ids[:, Q:], None if attention_mask is None else mask[:, Q:])
        return text_ids, (mask if matching else text_mask)

    def forward(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head=False,
                interpolate_pos_encoding=False) -> ImageTextMatchingOutput:
        """Blip2ForImageTextRetrieval.forward. ITM (use_image_text_matching_head=True): image b with
        text b, so as many texts as images. ITC (the default): every image with every text."""
        pixel_values = self._check_pixels(pixel_values)
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)  # [I, 257, 1408]
        input_ids, attention_mask = self._text_for_head(input_ids, attention_mask, use_image_text_matching_head)
        if use_image_text_matching_head:
            if input_ids.shape[0] != pixel_values.shape[0]:
                raise PromptError(
                    f"image-text matching pairs image b with text b, but there are {pixel_values.shape[0]} images "
                    f"(pixel_values) and {input_ids.shape[0]} texts (input_ids); give one text per image, or "
                    "use_image_text_matching_head=False to score every image against every text")
            text_embeds = self.matching_output(image_embeds, input_ids, attention_mask)  # [B, Q + L, 768]
            logits = self.itm_logits(text_embeds)  # [B, 2]
            text_embeds = like_weight(text_embeds, self.weights["itm_head"]["weight"])
        else:
            image_embeds = self.project(self.qformer(image_embeds), "vision_projection")  # [I, Q, 256]
            text_embeds = self.project(self.text_output(input_ids, attention_mask)[:, 0], "text_projection")  # [N, 256]
            logits = self.itc_logits(image_embeds, text_embeds)  # [I, N]
        return ImageTextMatchingOutput(to_numpy(logits), to_numpy(logits.T), to_numpy(text_embeds),
                                       to_numpy(image_embeds))

    # --- what people do with it -------------------------------------------------------------

    def match(self, image, texts):
        """The probability that each text describes `image` (one path, PIL image or array): ITM,
        softmax(logits)[:, 1]. A list of texts gives a NumPy array [N], one str a float."""
        items = text_list(texts)
        pixel_values = self._pixel_values([image])  # [1, 3, 224, 224]
        input_ids, attention_mask = self._text_inputs(items, with_images=True)  # [N, (Q +) L]
        input_ids, attention_mask = self._text_for_head(input_ids, attention_mask, matching=True)
        image_embeds = self.vision(pixel_values)  # the ViT once, then the same image for every text
        image_embeds = self.xp.broadcast_to(image_embeds, (len(items), *image_embeds.shape[1:]))  # [N, 257, 1408]
        logits = self.itm_logits(self.matching_output(image_embeds, input_ids, attention_mask))  # [N, 2]
        probabilities = to_numpy(softmax(logits.astype(self.xp.float32)))[:, 1]  # [N]
        return float(probabilities[0]) if isinstance(texts, str) else probabilities

    def similarity(self, images, texts):
        """ITC scores [images, texts]: for each pair the cosine of the best-matching query's
        embedding with the text's. One image or a list; one text or a list."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        items = text_list(texts)
        image_embeds = self.project(self.qformer(self.vision(self._pixel_values(images))), "vision_projection")
        input_ids, attention_mask = self._text_inputs(items, with_images=True)
        input_ids, attention_mask = self._text_for_head(input_ids, attention_mask, matching=False)
        text_embeds = self.project(self.text_output(input_ids, attention_mask)[:, 0], "text_projection")
        return to_numpy(self.itc_logits(image_embeds, text_embeds))  # [I, N]

    def _pixel_values(self, images):
        if not images:
            raise ImageError("images is an empty list: give at least one image")
        return self._need_processor()(images=images)["pixel_values"]

    # The processor's text half: [CLS] text [SEP], right-padded with [PAD] = 0, after 32 image
    # placeholders when the config has image_token_index. A text past the position table is named.
    def _text_inputs(self, texts, with_images):  # N texts -> [N, (Q +) L] ids and mask
        processor = self._need_processor()
        inputs = processor.text_inputs(texts, with_images, "right")  # BertTokenizer pads on the right
        lengths = inputs["attention_mask"].sum(axis=1) - (processor.num_query_tokens if with_images else 0)  # [N]
        check_text_lengths(texts, lengths, self.config.qformer.max_position_embeddings,
                           "the Q-Former (qformer_config.max_position_embeddings)")
        return inputs["input_ids"], inputs["attention_mask"]


@dataclass(frozen=True)
class TextModelOutput:
    """Blip2TextModelOutput's arrays: text_embeds [N, L, 256], every token projected and scaled to
    unit length (ITC reads the first, [CLS]); last_hidden_state [N, L, 768], the Q-Former's."""
    text_embeds: np.ndarray
    last_hidden_state: np.ndarray


class Blip2TextWithProjection(_Blip2QFormerStages):
    """Blip2TextModelWithProjection: texts -> embeddings to search images with."""

    @staticmethod
    def expected_shapes(config):
        c = config.qformer
        return {"query_tokens": (1, config.num_query_tokens, c.hidden_size),  # stored, unused
                **_prefixed("embeddings", text_embedding_shapes(c)),
                **_prefixed("qformer", qformer_shapes(c)),
                **linear_shapes("text_projection", config.image_text_hidden_size, c.hidden_size)}

    def forward(self, input_ids, attention_mask=None) -> TextModelOutput:
        hidden = self.text_output(input_ids, attention_mask)  # [N, L, 768]
        return TextModelOutput(to_numpy(self.project(hidden, "text_projection")), to_numpy(hidden))


@dataclass(frozen=True)
class VisionModelOutput:
    """Blip2VisionModelOutput's arrays: image_embeds [I, 32, 256], each query output projected and
    scaled to unit length; last_hidden_state [I, 257, 1408], the ViT's (not the Q-Former's)."""
    image_embeds: np.ndarray
    last_hidden_state: np.ndarray


class Blip2VisionWithProjection(_Blip2QFormerStages):
    """Blip2VisionModelWithProjection: images -> 32 embeddings each, to search texts with."""

    @staticmethod
    def expected_shapes(config):
        c = config.qformer
        return {"query_tokens": (1, config.num_query_tokens, c.hidden_size),
                **_prefixed("vision_model", vision_shapes(config.vision)),
                **_prefixed("qformer", qformer_shapes(c)),
                **linear_shapes("vision_projection", config.image_text_hidden_size, c.hidden_size)}

    def forward(self, pixel_values, interpolate_pos_encoding=False) -> VisionModelOutput:
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)  # [I, 257, 1408]
        projected = self.project(self.qformer(image_embeds), "vision_projection")  # [I, 32, 256]
        return VisionModelOutput(to_numpy(projected), to_numpy(image_embeds))


@dataclass(frozen=True)
class BaseModelOutputWithPooling:
    """The arrays of transformers' BaseModelOutputWithPooling that Blip2Model's features fill."""
    last_hidden_state: np.ndarray
    pooler_output: np.ndarray | None = None


class Blip2Features(_Blip2QFormerStages):
    """Blip2Model: the towers of Blip2ForConditionalGeneration (same weights), for features."""

    @staticmethod
    def expected_shapes(config):
        return blip2.expected_shapes(config)

    def get_image_features(self, pixel_values, interpolate_pos_encoding=False) -> BaseModelOutputWithPooling:
        """Blip2Model.get_image_features: the vision model's output. last_hidden_state [I, 257, 1408];
        pooler_output [I, 1408] is the CLS row through post_layernorm a second time (the last
        hidden state has had it once already), as Blip2VisionModel computes it."""
        hidden = self.vision(pixel_values, interpolate_pos_encoding)  # [I, 257, 1408]
        w = self.weights["vision_model"]["post_layernorm"]
        pooled = layer_norm(hidden[:, 0], w, self.config.vision.layer_norm_eps)  # [I, 1408]
        return BaseModelOutputWithPooling(to_numpy(hidden), to_numpy(pooled))

    def get_qformer_features(self, pixel_values, interpolate_pos_encoding=False):
        """Blip2Model.get_qformer_features: the Q-Former's last hidden state [I, 32, 768] (float32
        when the model is float16: the Q-Former is kept float32 and this is not cast back)."""
        return to_numpy(self.qformer(self.vision(pixel_values, interpolate_pos_encoding)))

    def get_text_features(self, input_ids, attention_mask=None) -> BaseModelOutputWithPooling:
        """Blip2Model.get_text_features: the language model's own reading of the text, without
        the image. OPT: the decoder's last hidden state [N, L, 2560] (after final_layer_norm);
        T5: the encoder's [N, L, 2048]. pooler_output is None, as there."""
        input_ids = _int_rows(input_ids, "input_ids")
        mask = np.ones_like(input_ids) if attention_mask is None else _int_rows(attention_mask, "attention_mask")
        text, w = self.config.text, self.weights["language_model"]
        if mask.shape != input_ids.shape:
            raise PromptError(f"attention_mask {mask.shape} must have the shape of input_ids {input_ids.shape}")
        check_mask(mask)
        if input_ids.min() < 0 or input_ids.max() >= text.vocab_size:
            raise PromptError(f"input_ids must lie in [0, {text.vocab_size}); found {input_ids.min()}..{input_ids.max()}")
        ids, mask = self.xp.asarray(input_ids), self.xp.asarray(mask)
        if text.is_encoder_decoder:
            hidden = t5.t5_encoder(t5.embed_tokens(ids, w), mask, w, text)
        else:
            if input_ids.shape[1] > text.max_position_embeddings:
                raise PromptError(f"input_ids has {input_ids.shape[1]} tokens, more than OPT's "
                                  f"{text.max_position_embeddings} positions; shorten the text")
            hidden = opt.opt_decoder(opt.embed_tokens(ids, w), mask, w, text)
        return BaseModelOutputWithPooling(to_numpy(hidden))


# --- loading ---------------------------------------------------------------------------------

# The config each class reads: Blip2Model's includes its language model (blip2.py's Blip2Config,
# whose image_token_index it does not need).
def read_config(folder, cls):
    values = read_config_json(folder)
    if cls is Blip2Features:
        return blip2.config_from_dict(values, needs_image_token=False)
    return config_from_dict(values, needs_text_input=cls in (Blip2Retrieval, Blip2TextWithProjection))


# `cls.from_pretrained(path, dtype=...).to(device)`: config, weights checked against the class's
# names and shapes (the Q-Former and query tokens kept float32 for float16, as transformers keeps
# them), processor when the folder has its files.
def load(cls, path, dtype="float32", progress=True, device="cpu", check_finite=True):
    folder = checkpoint_folder(path)
    config = read_config(folder, cls)
    dtype = check_dtype(dtype)
    if cls is Blip2Features:  # the language model's weights as Blip2ForConditionalGeneration loads them
        tied, ignored, keep = blip2.weight_rules(folder, config, dtype)
    else:
        tied, ignored, keep = {}, (), blip2.KEEP_IN_FLOAT32 if dtype == "float16" else ()
    processor = processor_of(folder, config, cls)
    vocab = ((config.text.vocab_size, "text_config.vocab_size") if cls is Blip2Features
             else (config.qformer.vocab_size, "qformer_config.vocab_size"))
    check_processor_fits(folder, processor, *vocab, config.num_query_tokens, config.vision.image_size)
    weights = load_weights(folder, cls.expected_shapes(config), tied=tied, ignored=ignored, dtype=dtype,
                           keep_float32=keep, device=device, progress=progress, check_finite=check_finite)
    return cls(config, weights, processor)


# Blip2Processor.from_pretrained(folder), when the folder has the files: the text models read
# BERT's vocabulary (vocab.txt), Blip2Model the language model's tokenizer, and the vision
# model only needs the image half.
def processor_of(folder, config, cls):
    check_tokenizer_present(folder, has_processor_files(folder))
    if not has_processor_files(folder):
        return None
    if cls is Blip2Features:
        return load_processor(folder)
    return load_retrieval_processor(folder, config.num_query_tokens, config.image_token_index)


load_retrieval = functools.partial(load, Blip2Retrieval)
load_text_with_projection = functools.partial(load, Blip2TextWithProjection)
load_vision_with_projection = functools.partial(load, Blip2VisionWithProjection)
load_blip2_model = functools.partial(load, Blip2Features)
