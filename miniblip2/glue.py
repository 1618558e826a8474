"""What the families' glue shares (blip2.py, blip2_retrieval.py, blip.py): the image stage, the
processor, the checks on pixels and ids, and `generate`, `caption` and `stream` written once over
a family's decoder.

    ImageModel      config, nested weights, processor; the ViT stage (BLIP and BLIP-2 run the
                    same layers under the same names, vision.py), batch_decode, input checks
    ImageToText     generate / caption / stream, for a family that writes text. It implements

        _prepare_generation(pixel_values, input_ids, attention_mask, seed, generator, use_cache,
                            interpolate_pos_encoding, arguments) -> decoder, gen, rng
            the inputs checked, the settings resolved (generation/settings.py), the towers run
            up to the text decoder, and the decoder for the loops (generation/loops.py)
        _caption_inputs(images, prompts) -> pixel_values, input_ids, attention_mask, prompt_length
            the processor's arrays for `caption` and `stream`, and the column of the generated
            ids where the new text starts

Legend: B images (= prompts), T prompt tokens, N new tokens, R rows (B x beams or samples).
"""

import numpy as np

from .errors import CheckpointError, ImageError, PromptError
from .generation.loops import beam_search, sample_steps
from .generation.streaming import TextStreamer
from .nn import namespace
from .runtime.device import to_numpy
from .runtime.precision import like_weight
from .vision import vision_model


# Token ids as the model takes them: [B, T] int64 on the host (one row may be given as [T]).
# `rows` and `least` name the rows and what may not be missing in the message (a text model:
# "texts", "text").
def as_int_array(values, name, rows="batch", least="token"):
    try:
        array = to_numpy(values)
    except (ValueError, TypeError) as err:  # ragged lists, objects NumPy cannot hold
        raise PromptError(f"{name} must be a 2-D integer array [{rows}, tokens]; got a {type(values).__name__} "
                          f"that is not one ({err})") from err
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) or 0 in array.shape:
        raise PromptError(f"{name} must be a 2-D integer array [{rows}, tokens] with at least one {least}; got "
                          f"{array.dtype} {array.shape}")
    return array.astype(np.int64)


# attention_mask [B, T]: 1 on real tokens, 0 on padding, and at least one real token in every row
# (a row of zeros attends to nothing, and a softmax over nothing is NaN).
def check_mask(mask):
    if not np.isin(mask, (0, 1)).all():
        raise PromptError(f"attention_mask must hold only 0 (padding) and 1 (real tokens); found "
                          f"{sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]}")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise PromptError(f"attention_mask row {int(empty[0])} is all 0, so that prompt has no token to read; "
                          "every row needs at least one 1 (build inputs with model.processor)")
    return mask


# caption's and stream's `prompt` for `n` images: None, one str for every image, or one per image.
def prompt_list(prompt, n):
    if n == 0:
        raise ImageError("image is an empty list; give one image or a non-empty list of images")
    if prompt is None or isinstance(prompt, str):
        return None if prompt is None else [prompt] * n
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise PromptError(f"prompt must be None, a str or a non-empty list of str (one per image); got a "
                      f"{type(prompt).__name__} ({str(prompt)[:40]!r})")


class ImageModel:
    """Config, weights and processor, the ViT, and the checks every family makes on its inputs.
    A subclass sets `self.xp` (numpy or cupy: where its weights live). Arrays in and out of the
    stages live on the model's device, so they chain there without copies."""

    def __init__(self, config, weights, processor=None):
        self.config = config
        self.weights = weights
        self.processor = processor

    # Blip2VisionModel / BlipVisionModel: last_hidden_state.
    def vision(self, pixel_values, interpolate_pos_encoding=False):  # [B, 3, H, W] -> [B, 257, 1408]
        w = self.weights["vision_model"]
        # pixel_values.to(patch_embedding.weight.dtype), on the weights' device
        pixel_values = like_weight(self.xp.asarray(self._check_pixels(pixel_values, finite=True)),
                                   w["embeddings"]["patch_embedding"]["weight"])
        return vision_model(pixel_values, w, self.config.vision, interpolate_pos_encoding)

    def batch_decode(self, ids, skip_special_tokens=True):
        return self._need_processor().tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def _need_processor(self):
        if self.processor is None:
            raise CheckpointError("this model was loaded without its tokenizer and preprocessor files; "
                                  "put them in the checkpoint folder (see weights/README.md)")
        return self.processor

    # pixel_values: [B, 3, H, W] real numbers, B >= 1, each side at least one patch; with
    # `finite`, NaN and infinity are refused too (once, where the pixels enter the vision tower).
    def _check_pixels(self, pixel_values, finite=False):
        if not hasattr(pixel_values, "shape") or len(pixel_values.shape) != 4 or pixel_values.shape[1] != 3:
            shape = getattr(pixel_values, "shape", type(pixel_values).__name__)
            raise ImageError(f"pixel_values must be a [batch, 3, height, width] array; got {shape}. "
                             "Use model.processor(images=...) to make it from images")
        B, _, height, width = pixel_values.shape
        patch = self.config.vision.patch_size
        if getattr(getattr(pixel_values, "dtype", None), "kind", None) not in ("f", "i", "u"):
            raise ImageError(f"pixel_values must hold real numbers (float32); got dtype "
                             f"{getattr(pixel_values, 'dtype', None)}. Use model.processor(images=...)")
        if B == 0:
            raise ImageError("pixel_values holds no image (batch size 0); give at least one image")
        if min(height, width) < patch:
            raise ImageError(f"pixel_values of {height}x{width} px are smaller than one {patch}x{patch} patch, "
                             "even with interpolate_pos_encoding; resize the image with the processor")
        if finite and not bool(namespace(pixel_values).isfinite(pixel_values).all()):
            raise ImageError("pixel_values contain NaN or infinite values, which would make every output NaN; "
                             "check the image, and the image processor's image_std and rescale_factor")
        return pixel_values


# GenerationMixin.generate after its preparation: beam search, or greedy/sampling one step at a
# time with the streamer told each step's ids. Prompt ids followed by the new ids, NumPy.
def generated_ids(decoder, gen, rng, streamer=None):  # -> [R, T + N]
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise PromptError(f"`streamer` must have put(ids) and end() methods, as transformers' streamers do (see "
                          f"miniblip2.TextStreamer); got a {type(streamer).__name__}")
    if gen.num_beams > 1:
        if streamer is not None:
            raise PromptError("`streamer` cannot be used with beam search (as in transformers): the text is "
                              "known only at the end. Set num_beams=1")
        return to_numpy(beam_search(decoder, gen, rng))
    ids = [to_numpy(decoder.prompt_ids)]
    if streamer is not None:
        streamer.put(ids[0])
    for next_ids in sample_steps(decoder, gen, rng):
        ids.append(next_ids[:, None])  # NumPy: each step's ids come to the host anyway
        if streamer is not None:
            streamer.put(next_ids)
    if streamer is not None:
        streamer.end()
    return np.concatenate(ids, axis=1)


class ImageToText(ImageModel):
    """generate, caption and stream for a family that writes text (see the module docstring)."""

    def generate(self, pixel_values, input_ids=None, attention_mask=None, max_new_tokens=None, *, seed=None,
                 generator=None, streamer=None, use_cache=True, interpolate_pos_encoding=False, **generation_kwargs):
        """Prompt ids followed by the new ids, laid out as the transformers class's `generate`.

        Takes transformers' names: max_new_tokens, max_length, min_new_tokens, min_length,
        do_sample, num_beams, num_return_sequences, temperature, top_k, top_p, repetition_penalty,
        no_repeat_ngram_size, length_penalty, early_stopping (True, False, "never"), eos_token_id
        (an id or a list), pad_token_id. Unset ones take transformers' defaults (greedy, 20 new
        tokens, top_k 50) with the eos and pad the transformers class generates with; like
        transformers 5.23, the settings in generation_config.json are not read.

        Sampling draws from `generator` (a np.random.Generator) or from a new one seeded with
        `seed`: reproducible, from the distribution transformers samples, but never the very ids
        torch's random stream would give. `streamer` is called as transformers calls one:
        put(prompt ids [1, T]), put(new id [1]) after each step, end(); see `TextStreamer`.
        With num_return_sequences n, each input's n rows come together, best beam first."""
        decoder, gen, rng = self._prepare_generation(pixel_values, input_ids, attention_mask, seed, generator, use_cache,
                                                      interpolate_pos_encoding,
                                                      dict(max_new_tokens=max_new_tokens, **generation_kwargs))
        return generated_ids(decoder, gen, rng, streamer)

    def caption(self, image, prompt=None, max_new_tokens=30, **generate_kwargs):
        """The generated text for one image (a str) or for a list of images (a list of str).

        With a prompt ("Question: ... Answer:" for BLIP-2, see `chat_prompt`; "a photography of"
        for BLIP) only the continuation is returned; `generate` and `batch_decode` give the prompt
        and the continuation together, as transformers does. Takes `generate`'s arguments; with
        num_return_sequences n > 1 each image gives a list of n texts instead of one."""
        return self._texts(image, prompt, max_new_tokens, generate_kwargs)

    def _texts(self, image, prompt, max_new_tokens, generate_kwargs):
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        prompts = prompt_list(prompt, len(images))
        pixel_values, input_ids, attention_mask, prompt_length = self._caption_inputs(images, prompts)
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
        if not (prompt is None or isinstance(prompt, str)):
            raise PromptError(f"stream takes one prompt, a str; got a {type(prompt).__name__} ({str(prompt)[:40]!r})")
        pixel_values, input_ids, attention_mask, _ = self._caption_inputs([image], prompt_list(prompt, 1))
        decoder, gen, rng = self._prepare_generation(pixel_values, input_ids, attention_mask, seed, generator, use_cache,
                                                      interpolate_pos_encoding,
                                                      dict(max_new_tokens=max_new_tokens, **generation_kwargs))
        if gen.num_beams > 1 or gen.num_return_sequences > 1:
            raise PromptError("stream gives one text by greedy search or sampling: set num_beams=1 and "
                              "num_return_sequences=1 (use caption for beam search)")
        streamer = TextStreamer(self._need_processor().tokenizer)
        streamer.put(to_numpy(decoder.prompt_ids))
        for next_ids in sample_steps(decoder, gen, rng):
            if piece := streamer.put(next_ids):
                yield piece
        if piece := streamer.end():
            yield piece
