"""BLIP's matching models (transformers' modeling_blip.py): does a text describe an image, and
CLIP-style features, from the ViT of vision.py and the BERT text model of bert.py.

    BlipForImageTextRetrieval  BlipRetrieval  forward -> ITM [B, 2] or ITC [I, N]; match, similarity
                                              (Salesforce/blip-itm-base-coco, -large-coco, -flickr)
    BlipModel                  BlipFeatures   get_image_features, get_text_features,
                                              get_multimodal_features, forward -> logits_per_image
    BlipTextModel              BlipText       forward -> last_hidden_state, pooler_output
    BlipVisionModel            BlipVision     forward -> last_hidden_state, pooler_output

image -> vision_model -> image_embeds [I, 577, 768]: 1 CLS + 24 x 24 patches of 16 px
text  -> [CLS] words [SEP] -> BERT text encoder, bidirectional -> [N, L, 768]

ITM, image-text matching (BlipRetrieval's default head, use_itm_head=True): the text encoder
reads the text and, in every layer's cross-attention, the image; `itm_head` on its first row
([CLS]) -> itm_score [B, 2]: (no match, match) for the B image-text pairs.
ITC, image-text contrastive (use_itm_head=False): the text encoder on the text alone (no
cross-attention); `vision_proj` of the image's CLS row and `text_proj` of the text's [CLS] row,
each scaled to unit length -> itm_score [I, N], every image against every text. No temperature.
BlipModel is CLIP's recipe on BLIP's towers: the vision pooler and the text pooler (dense + tanh
on [CLS]) projected without bias, unit length, cosines times exp(logit_scale).

What transformers 5.23 does that is kept here:
- Both heads read [CLS] (101) as the tokenizer gives it; the original BLIP put [ENC] (30523) in
  its place for ITM. The released scores (CHECKPOINTS.md 7.3) are transformers' own.
- ITM pairs image b with text b, and one image goes with every text (or one text with every
  image): torch's matmul broadcasts the batch in the cross-attention, and so does NumPy's here.
  Any other pairing is refused (transformers fails with a size mismatch).
- ITC's itm_score is image-major [I, N] (`image_feat @ text_feat.t()`); the cosines are
  returned as they are, while BlipModel's logits are scaled by exp(logit_scale).
- BlipVisionModel's pooler_output is the CLS row through post_layernorm a second time.
- BlipModel normalises with x / ||x||, no epsilon (F.normalize's 1e-12 in BlipRetrieval).

Nothing is kept in float32 in float16: BLIP has no _keep_in_fp32_modules.

Legend (blip-itm-base-coco): I images, N texts, B pairs, L text tokens, S image tokens (577), E
image width (768; 1024 for -large), D text width (768), C ITM/ITC width (image_text_hidden_size,
256), P BlipModel's projection width (projection_dim, 512).
"""

import functools
from dataclasses import dataclass

import numpy as np

from .bert import BlipTextConfig, pooler_shapes, text_encoder, text_model_shapes, text_pooler
from .blip import read_config as read_blip_config
from .blip2_retrieval import BaseModelOutputWithPooling
from .checkpoint.config import check_activation, check_heads, from_dict, read_config_json
from .checkpoint.loading import check_processor_fits, check_tokenizer_present, checkpoint_folder, load_weights
from .checkpoint.processor import has_processor_files, load_blip_processor
from .errors import CheckpointError, ImageError, PromptError
from .glue import ImageModel, as_int_array, check_mask
from .nn import layer_norm, linear, linear_shapes, namespace, softmax
from .retrieval import check_text_lengths, l2_normalize, text_list
from .runtime.device import to_numpy
from .runtime.precision import check_dtype, like_weight, matmul, widen
from .runtime.trace import record
from .vision import BlipVisionConfig, VisionConfig, vision_model
from .vision import expected_shapes as vision_shapes


def _prefixed(prefix, shapes):
    return {f"{prefix}.{name}": shape for name, shape in shapes.items()}


# --- pure functions: the heads ----------------------------------------------------------------

# BlipVisionModel's pooler_output: post_layernorm on the CLS row, which last_hidden_state has
# already been through once. `w` is the vision model's weights.
def vision_pooler(image_embeds, w, config):  # [I, S, E] -> [I, E]
    return layer_norm(image_embeds[:, 0], w["post_layernorm"], config.layer_norm_eps)


# A projection, then unit length: F.normalize (eps 1e-12) in BlipForImageTextRetrieval, plain
# x / ||x|| (eps 0) in BlipModel.
def unit_projection(x, w, eps=1e-12):  # [..., E or D] -> [..., C or P]
    return record(w, l2_normalize(linear(x, w), w["weight"], eps))


# Cosines of unit vectors, rounded as torch's half matmul rounds them (`like`: a head's weight).
def cosines(a, b, like):  # [M, C], [K, C] -> [M, K]
    return like_weight(matmul(a, b.T), like)


# BlipModel.forward's `matmul(text_embeds, image_embeds.t()) * logit_scale.exp()`: exp and the
# product each rounded to the parameter's dtype, as torch computes them in half.
def scaled_logits(text_embeds, image_embeds, logit_scale):  # [N, P], [I, P], () -> [N, I]
    xp = namespace(text_embeds)
    scale = like_weight(xp.exp(widen(logit_scale).astype(xp.float32)), logit_scale)  # ()
    return like_weight(cosines(text_embeds, image_embeds, logit_scale) * scale, logit_scale)


# --- input checks: one clear error, naming the argument, before any product -----------------

# Token ids (and mask) for BLIP's text model, on the host: [N, L] ints in the vocabulary, no
# longer than the learned position table. A zero-row batch is refused by as_int_array.
def check_text(input_ids, attention_mask, config, name="input_ids"):  # -> [N, L], [N, L] or None
    ids = as_int_array(input_ids, name)
    mask = None if attention_mask is None else check_mask(as_int_array(attention_mask, "attention_mask"))
    if mask is not None and mask.shape != ids.shape:
        raise PromptError(f"attention_mask {mask.shape} must have the shape of {name} {ids.shape}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise PromptError(f"{name} must lie in [0, {config.vocab_size}), the text model's vocabulary "
                          f"(text_config.vocab_size); found {ids.min()}..{ids.max()}. Tokenize with model.processor")
    if ids.shape[1] > config.max_position_embeddings:
        raise PromptError(f"{name} has {ids.shape[1]} tokens per text, more than the text model's "
                          f"{config.max_position_embeddings} positions (text_config.max_position_embeddings); "
                          "shorten the text")
    return ids, mask


# The pairs a cross-attention pass scores: image b with text b, or one of either for all of the
# other (what torch broadcasts). `what` names the call in the message, `hint` the alternative.
ITM_HINT = ", or use_itm_head=False to score every image against every text"


def check_pairs(images, texts, what="image-text matching (use_itm_head=True)", hint=ITM_HINT):  # -> B
    if images != texts and 1 not in (images, texts):
        raise PromptError(f"{what} pairs image b with text b, but there are {images} images (pixel_values) and "
                          f"{texts} texts (input_ids); give one text per image (or one image for all texts, one text "
                          f"for all images){hint}")
    return max(images, texts)


class _BlipTextStages(ImageModel):
    """glue.ImageModel (the ViT, input checks) plus BLIP's text encoder, with or without the image,
    under the checkpoint's name for it (`text_tower`), and texts and images as the processor
    gives them."""

    text_tower = "text_encoder"  # BlipForImageTextRetrieval's; BlipModel's is `text_model`

    def __init__(self, config, weights, processor=None):
        super().__init__(config, weights, processor)
        self.xp = namespace(weights["vision_model"]["post_layernorm"]["weight"])  # numpy or cupy

    # BlipTextModel.forward(input_ids, attention_mask, encoder_hidden_states=image_embeds): the
    # text reading itself and, when image_embeds is given, the image in every layer.
    def encode_text(self, input_ids, attention_mask=None, image_embeds=None):  # [N, L], [I, S, E] -> [B, L, D]
        xp, w = self.xp, self.weights[self.text_tower]
        mask = None if attention_mask is None else xp.asarray(attention_mask)
        image = None if image_embeds is None else like_weight(xp.asarray(image_embeds),
                                                               w["embeddings"]["LayerNorm"]["weight"])
        return text_encoder(xp.asarray(input_ids), mask, image, w, self.config.text)

    def _pixel_values(self, images):
        if not images:
            raise ImageError("images is an empty list: give at least one image")
        return self._need_processor()(images=images)["pixel_values"]  # [I, 3, 384, 384]

    # BlipProcessor's text half: [CLS] text [SEP], right-padded with [PAD] = 0. A text past the
    # position table is named.
    def _text_inputs(self, texts):  # N texts -> [N, L] ids and mask
        inputs = self._need_processor().text_inputs(texts, False, "right")
        lengths = inputs["attention_mask"].sum(axis=1)  # [N]
        check_text_lengths(texts, lengths, self.config.text.max_position_embeddings,
                           "the text model (text_config.max_position_embeddings)")
        return inputs["input_ids"], inputs["attention_mask"]


# --- BlipForImageTextRetrieval -------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTextMatchingOutput:
    """BlipImageTextMatchingModelOutput's arrays, as NumPy (its other fields stay None there).

    ITM: itm_score [B, 2] (no match, match); question_embeds [B, L, D], the text encoder's output
         having read the image. ITC: itm_score [I, N] cosines; question_embeds [N, L, D], the
         text alone. Both: last_hidden_state [I, 577, E], the ViT's."""
    itm_score: np.ndarray
    last_hidden_state: np.ndarray
    question_embeds: np.ndarray


class BlipRetrieval(_BlipTextStages):
    """BlipForImageTextRetrieval: does a text describe an image? (Salesforce/blip-itm-base-coco)"""

    @staticmethod
    def expected_shapes(config):
        C, D, E = config.image_text_hidden_size, config.text.hidden_size, config.vision.hidden_size
        return {**_prefixed("vision_model", vision_shapes(config.vision)),
                **_prefixed("text_encoder", text_model_shapes(config.text)),  # no pooler
                **linear_shapes("vision_proj", C, E), **linear_shapes("text_proj", C, D),
                **linear_shapes("itm_head", 2, D)}

    # --- the stages, each returning what the reference computes at that point ----------------

    # itm_head on the [CLS] row of the text encoder's output (which read the image).
    def itm_logits(self, question_embeds):  # [B, L, D] -> [B, 2]
        w = self.weights["itm_head"]
        return record(w, linear(question_embeds[:, 0], w))

    # vision_proj of the image's CLS row and text_proj of the text's [CLS] row, unit length, then
    # every image against every text.
    def itc_scores(self, image_embeds, question_embeds):  # [I, S, E], [N, L, D] -> [I, N]
        image_feat = unit_projection(image_embeds[:, 0], self.weights["vision_proj"])  # [I, C]
        text_feat = unit_projection(question_embeds[:, 0], self.weights["text_proj"])  # [N, C]
        return cosines(image_feat, text_feat, self.weights["text_proj"]["weight"])

    def forward(self, pixel_values, input_ids, attention_mask=None, use_itm_head=True,
                interpolate_pos_encoding=False) -> ImageTextMatchingOutput:
        """BlipForImageTextRetrieval.forward (pixel_values first here; keyword calls are the same).
        use_itm_head=True (the default): ITM, image b with text b -> itm_score [B, 2].
        use_itm_head=False: ITC, every image with every text -> itm_score [I, N] cosines."""
        input_ids, attention_mask = check_text(input_ids, attention_mask, self.config.text)
        pixel_values = self._check_pixels(pixel_values)
        if use_itm_head:
            check_pairs(pixel_values.shape[0], input_ids.shape[0])
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)  # [I, 577, E]
        if use_itm_head:  # the text reads the image; one image or text broadcasts over the other
            question_embeds = self.encode_text(input_ids, attention_mask, image_embeds)  # [B, L, D]
            score = self.itm_logits(question_embeds)  # [B, 2]
        else:
            question_embeds = self.encode_text(input_ids, attention_mask)  # [N, L, D]
            score = self.itc_scores(image_embeds, question_embeds)  # [I, N]
        return ImageTextMatchingOutput(to_numpy(score), to_numpy(image_embeds), to_numpy(question_embeds))

    # --- what people do with it (retrieval.rank_texts, `miniblip2 match`) --------------------

    def match(self, image, texts):
        """The probability that each text describes `image` (one path, PIL image or array): ITM,
        softmax(itm_score)[:, 1]. A list of texts gives a NumPy array [N], one str a float."""
        items = text_list(texts)
        input_ids, attention_mask = self._text_inputs(items)  # [N, L]
        image_embeds = self.vision(self._pixel_values([image]))  # [1, 577, E]: the ViT once, for every text
        logits = self.itm_logits(self.encode_text(input_ids, attention_mask, image_embeds))  # [N, 2]
        probabilities = to_numpy(softmax(logits.astype(self.xp.float32)))[:, 1]  # [N]
        return float(probabilities[0]) if isinstance(texts, str) else probabilities

    def similarity(self, images, texts):
        """ITC scores [images, texts]: the cosine of the image's and the text's projected first
        tokens. One image or a list; one text or a list."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        items = text_list(texts)
        input_ids, attention_mask = self._text_inputs(items)
        image_embeds = self.vision(self._pixel_values(images))  # [I, 577, E]
        return to_numpy(self.itc_scores(image_embeds, self.encode_text(input_ids, attention_mask)))  # [I, N]


# --- BlipModel -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlipOutput:
    """BlipOutput's arrays: logits_per_image [I, N] = exp(logit_scale) x cosine, logits_per_text
    [N, I] its transpose, text_embeds [N, P] and image_embeds [I, P] (projected, unit length), and
    the two towers' own outputs (pooler_output before the projection)."""
    logits_per_image: np.ndarray
    logits_per_text: np.ndarray
    text_embeds: np.ndarray
    image_embeds: np.ndarray
    text_model_output: BaseModelOutputWithPooling
    vision_model_output: BaseModelOutputWithPooling


class BlipFeatures(_BlipTextStages):
    """BlipModel: CLIP-style image and text embeddings and their scaled cosines."""

    text_tower = "text_model"

    @staticmethod
    def expected_shapes(config):
        P, D, E = config.projection_dim, config.text.hidden_size, config.vision.hidden_size
        return {**_prefixed("vision_model", vision_shapes(config.vision)),
                **_prefixed("text_model", text_model_shapes(config.text)),
                **_prefixed("text_model.pooler", pooler_shapes(config.text)),
                **linear_shapes("visual_projection", P, E, bias=False),
                **linear_shapes("text_projection", P, D, bias=False), "logit_scale": ()}

    # --- the stages ----------------------------------------------------------------------------

    # BlipVisionModel: last_hidden_state and pooler_output.
    def image_tower(self, pixel_values, interpolate_pos_encoding=False):  # -> [I, 577, E], [I, E]
        hidden = self.vision(pixel_values, interpolate_pos_encoding)
        return hidden, vision_pooler(hidden, self.weights["vision_model"], self.config.vision)

    # BlipTextModel with its pooler, on the text alone (or reading the image).
    def text_tower_outputs(self, input_ids, attention_mask, image_embeds=None):  # -> [B, L, D], [B, D]
        hidden = self.encode_text(input_ids, attention_mask, image_embeds)
        return hidden, text_pooler(hidden, self.weights["text_model"]["pooler"])

    def get_image_features(self, pixel_values, interpolate_pos_encoding=False) -> BaseModelOutputWithPooling:
        """BlipModel.get_image_features: the vision model's output, its pooler_output replaced by
        visual_projection of it [I, P] (not unit length); last_hidden_state [I, 577, E]."""
        hidden, pooled = self.image_tower(pixel_values, interpolate_pos_encoding)
        return BaseModelOutputWithPooling(to_numpy(hidden),
                                          to_numpy(linear(pooled, self.weights["visual_projection"])))

    def get_text_features(self, input_ids, attention_mask=None) -> BaseModelOutputWithPooling:
        """BlipModel.get_text_features: the text model's output (text alone), its pooler_output
        replaced by text_projection of it [N, P] (not unit length); last_hidden_state [N, L, D]."""
        input_ids, attention_mask = check_text(input_ids, attention_mask, self.config.text)
        hidden, pooled = self.text_tower_outputs(input_ids, attention_mask)
        return BaseModelOutputWithPooling(to_numpy(hidden), to_numpy(linear(pooled, self.weights["text_projection"])))

    def get_multimodal_features(self, pixel_values, input_ids, attention_mask=None,
                                interpolate_pos_encoding=False):
        """BlipModel.get_multimodal_features: the text reading the image (cross-attention, image b
        with text b), pooled and through text_projection -> [B, P], as NumPy."""
        input_ids, attention_mask = check_text(input_ids, attention_mask, self.config.text)
        check_pairs(self._check_pixels(pixel_values).shape[0], input_ids.shape[0], "get_multimodal_features", "")
        if not self.config.text.is_decoder:
            raise CheckpointError("config.json: text_config.is_decoder is false, so this BlipModel's text layers have "
                                  "no cross-attention and cannot read the image (get_multimodal_features)")
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)
        _, pooled = self.text_tower_outputs(input_ids, attention_mask, image_embeds)
        return to_numpy(linear(pooled, self.weights["text_projection"]))

    def forward(self, pixel_values, input_ids, attention_mask=None, interpolate_pos_encoding=False) -> BlipOutput:
        """BlipModel.forward (pixel_values first here; keyword calls are the same): every image
        against every text, logits_per_image [I, N] = exp(logit_scale) x cosine."""
        input_ids, attention_mask = check_text(input_ids, attention_mask, self.config.text)
        image_hidden, image_pooled = self.image_tower(pixel_values, interpolate_pos_encoding)  # [I, 577, E], [I, E]
        text_hidden, text_pooled = self.text_tower_outputs(input_ids, attention_mask)  # [N, L, D], [N, D]
        image_embeds = unit_projection(image_pooled, self.weights["visual_projection"], eps=0.0)  # [I, P]
        text_embeds = unit_projection(text_pooled, self.weights["text_projection"], eps=0.0)  # [N, P]
        logits_per_text = scaled_logits(text_embeds, image_embeds, self.weights["logit_scale"])  # [N, I]
        return BlipOutput(to_numpy(logits_per_text.T), to_numpy(logits_per_text), to_numpy(text_embeds),
                          to_numpy(image_embeds),
                          BaseModelOutputWithPooling(to_numpy(text_hidden), to_numpy(text_pooled)),
                          BaseModelOutputWithPooling(to_numpy(image_hidden), to_numpy(image_pooled)))

    def similarity(self, images, texts):
        """The cosines [images, texts] of BlipModel's unit embeddings (logits_per_image without
        the logit scale). One image or a list; one text or a list."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        input_ids, attention_mask = self._text_inputs(text_list(texts))
        _, image_pooled = self.image_tower(self._pixel_values(images))
        _, text_pooled = self.text_tower_outputs(input_ids, attention_mask)
        image_embeds = unit_projection(image_pooled, self.weights["visual_projection"], eps=0.0)
        text_embeds = unit_projection(text_pooled, self.weights["text_projection"], eps=0.0)
        return to_numpy(cosines(image_embeds, text_embeds, self.weights["text_projection"]["weight"]))


# --- BlipTextModel and BlipVisionModel, saved alone ----------------------------------------------

# BlipTextConfig or BlipVisionConfig saved alone: one tower, its fields at the top of config.json
# (model_type blip_text_model / blip_vision_model). `text` and `vision` as in blip.BlipConfig.
@dataclass(frozen=True)
class TowerConfig:
    text: BlipTextConfig | None = None
    vision: VisionConfig | None = None


TOWERS = {"text": ("blip_text_model", BlipTextConfig), "vision": ("blip_vision_model", BlipVisionConfig)}


# BlipTextConfig.from_pretrained / BlipVisionConfig.from_pretrained. A standalone text config keeps
# its own encoder_hidden_size (no BlipConfig to set it to the vision width).
def tower_config_from_dict(values, tower) -> TowerConfig:
    model_type, cls = TOWERS[tower]
    if not isinstance(values, dict) or values.get("model_type") != model_type:
        found = values.get("model_type") if isinstance(values, dict) else values
        raise CheckpointError(f"config.json has model_type {found!r}; a Blip{tower.title()}Model saved alone has "
                              f"{model_type!r}, its fields at the top level; re-download config.json")
    config = from_dict(cls, values, model_type)
    check_activation(f"{model_type}.hidden_act", config.hidden_act)
    check_heads(model_type, config.hidden_size, config.num_attention_heads)
    return TowerConfig(**{tower: config})


class BlipText:
    """BlipTextModel (with its pooler) saved alone: token ids -> hidden states and pooled text."""

    def __init__(self, config, weights, processor=None):
        self.config, self.weights, self.processor = config, weights, processor
        self.xp = namespace(weights["embeddings"]["LayerNorm"]["weight"])

    @staticmethod
    def expected_shapes(config):
        return {**text_model_shapes(config.text), **_prefixed("pooler", pooler_shapes(config.text))}

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None) -> BaseModelOutputWithPooling:
        """BlipTextModel.forward: bidirectional, reading encoder_hidden_states [B or 1, S, E]
        through cross-attention when given. last_hidden_state [N, L, D], pooler_output [N, D]."""
        xp, text = self.xp, self.config.text
        input_ids, attention_mask = check_text(input_ids, attention_mask, text)
        context = None
        if encoder_hidden_states is not None:
            context = self._check_context(encoder_hidden_states, input_ids.shape[0])
            context = like_weight(xp.asarray(context), self.weights["embeddings"]["LayerNorm"]["weight"])
        mask = None if attention_mask is None else xp.asarray(attention_mask)
        hidden = text_encoder(xp.asarray(input_ids), mask, context, self.weights, text)  # [B, L, D]
        return BaseModelOutputWithPooling(to_numpy(hidden), to_numpy(text_pooler(hidden, self.weights["pooler"])))

    def _check_context(self, context, texts):
        text = self.config.text
        if not text.is_decoder:
            raise PromptError("encoder_hidden_states given, but this BlipTextModel has no cross-attention "
                              "(config.json is_decoder is false); call forward without it")
        shape = getattr(context, "shape", None)
        if shape is None or len(shape) != 3 or shape[2] != text.encoder_hidden_size:
            raise PromptError(f"encoder_hidden_states must be [batch, tokens, {text.encoder_hidden_size}] "
                              f"(encoder_hidden_size); got {shape or type(context).__name__}")
        if shape[0] not in (1, texts):
            raise PromptError(f"encoder_hidden_states has {shape[0]} rows for {texts} texts (input_ids): give one per "
                              "text, or one for all")
        return context


class BlipVision(ImageModel):
    """BlipVisionModel saved alone: pixel_values -> image tokens and the pooled CLS row."""

    def __init__(self, config, weights, processor=None):
        super().__init__(config, weights, processor)
        self.xp = namespace(weights["post_layernorm"]["weight"])

    @staticmethod
    def expected_shapes(config):
        return vision_shapes(config.vision)

    # glue.ImageModel.vision on this file's names: the tower is at the top, not under vision_model.
    def vision(self, pixel_values, interpolate_pos_encoding=False):  # [I, 3, H, W] -> [I, 577, E]
        w = self.weights
        pixel_values = like_weight(self.xp.asarray(self._check_pixels(pixel_values, finite=True)),
                                   w["embeddings"]["patch_embedding"]["weight"])
        return vision_model(pixel_values, w, self.config.vision, interpolate_pos_encoding)

    def forward(self, pixel_values, interpolate_pos_encoding=False) -> BaseModelOutputWithPooling:
        """BlipVisionModel.forward: last_hidden_state [I, 577, E], pooler_output [I, E]."""
        hidden = self.vision(pixel_values, interpolate_pos_encoding)
        return BaseModelOutputWithPooling(to_numpy(hidden), to_numpy(vision_pooler(hidden, self.weights,
                                                                                    self.config.vision)))


# --- loading ---------------------------------------------------------------------------------

# The config each class reads: BlipConfig (model_type "blip") for the two models on both towers,
# BlipModel's text allowed without cross-attention; a tower's own config for the two alone.
READ_CONFIG = {
    BlipRetrieval: read_blip_config,
    BlipFeatures: functools.partial(read_blip_config, needs_cross_attention=False),
    BlipText: lambda folder: tower_config_from_dict(read_config_json(folder), "text"),
    BlipVision: lambda folder: tower_config_from_dict(read_config_json(folder), "vision"),
}

# Names a file may hold that no module uses: the text embeddings' int64 position_ids buffer
# (written by 2022 torch.save, as in blip-itm-base-coco's pytorch_model.bin).
IGNORED_WEIGHTS = {BlipRetrieval: ("text_encoder.embeddings.position_ids",),
                   BlipFeatures: ("text_model.embeddings.position_ids",),
                   BlipText: ("embeddings.position_ids",), BlipVision: ()}


# BlipProcessor.from_pretrained(folder), checked against the config. The models on both towers
# need it for match and similarity, so its files come together or not at all; a tower saved
# alone takes arrays, and gets a processor only where the folder has both halves of one.
def processor_of(cls, folder, config):
    if cls in (BlipText, BlipVision):
        complete = has_processor_files(folder) and (folder / "preprocessor_config.json").is_file()
        return load_blip_processor(folder) if complete else None
    check_tokenizer_present(folder, has_processor_files(folder))
    if not has_processor_files(folder):
        return None
    processor = load_blip_processor(folder)
    check_processor_fits(folder, processor, config.text.vocab_size, "text_config.vocab_size", 0,
                         config.vision.image_size)
    return processor


# `cls.from_pretrained(path, dtype=...).to(device)`: config, processor, weights checked against
# the class's names and shapes (NaN and infinity too, unless check_finite=False), in `dtype`.
def load(cls, path, dtype="float32", progress=True, device="cpu", check_finite=True):
    folder = checkpoint_folder(path)
    config = READ_CONFIG[cls](folder)
    dtype = check_dtype(dtype)
    processor = processor_of(cls, folder, config)
    weights = load_weights(folder, cls.expected_shapes(config), ignored=IGNORED_WEIGHTS[cls], dtype=dtype,
                           device=device, progress=progress, check_finite=check_finite)
    return cls(config, weights, processor)


load_retrieval = functools.partial(load, BlipRetrieval)
load_blip_model = functools.partial(load, BlipFeatures)
load_text_model = functools.partial(load, BlipText)
load_vision_model = functools.partial(load, BlipVision)
