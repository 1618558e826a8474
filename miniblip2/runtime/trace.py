"""Tracing: run the model and get back its intermediates, named by their checkpoint paths.

    t = model.trace(image)                           # one forward pass; t is {name: NumPy array}
    t["vision_model.encoder.layers.3"]               # [1, 257, 1408]: the output of ViT layer 3
    t["vision_model.encoder.layers.3.self_attn.probs"]  # [1, 16, 257, 257]: its attention probabilities

    with recording(model) as records:                # any calls; one array per call and name
        model.generate(pixel_values, max_new_tokens=5)
    records["language_model.lm_head"]                # a list: the logits of each step

A name is the checkpoint path of the module whose output it is, exactly as the weights are
named (`git grep` finds the code), so `t[name]` is what a forward hook on that module of
transformers' `Blip2ForConditionalGeneration` would see. The one suffix: `.probs` after an
attention module's path holds its attention probabilities [B, H, T, S], what transformers
returns with `output_attentions=True`.

How it works: the model functions call `record(w, value)` with the weights `w` of the module
that made `value`. Recording is off unless a `recording` block is open in this thread (or
asyncio task), and then `record` is one lookup and a return: the math is untouched. When on, the
recorder knows every weights dict's path (it walked `model.weights` once), so the name comes
from the weights themselves and cannot drift from the checkpoint.

Legend: B batch, T tokens (queries), S keys, H heads.
"""

import contextvars
from contextlib import contextmanager

import numpy as np

from .device import to_numpy

PROBS = ".probs"  # the suffix of attention probabilities
_recorder = contextvars.ContextVar("miniblip2_recorder", default=None)


# Called by the model code: keep `value` under the path of the module weights `w` (plus `suffix`),
# when a recording is on and `w` belongs to the recorded model. Returns `value` unchanged.
def record(w, value, suffix=""):
    recorder = _recorder.get()
    if recorder is not None and id(w) in recorder.paths:
        # a copy: some arrays are later written in place (the prompt embeddings, the KV cache)
        recorder.records.setdefault(recorder.paths[id(w)] + suffix, []).append(value.copy())
    return value


class _Recorder:
    def __init__(self, weights):
        self.paths = dict(_module_paths(weights))  # id(weights dict) -> "vision_model.encoder.layers.3"
        self.records = {}  # name -> [array, one per call]


# Every dict of the nested weights with its checkpoint path: w["qformer"]["encoder"]["layer"][2]
# is "qformer.encoder.layer.2".
def _module_paths(tree, path=""):
    if isinstance(tree, dict):
        yield id(tree), path
        children = tree.items()
    elif isinstance(tree, list):
        children = enumerate(tree)
    else:
        return  # an array: a parameter, not a module
    for key, child in children:
        yield from _module_paths(child, f"{path}.{key}" if path else str(key))


@contextmanager
def recording(model):
    """Record the intermediates of every call to `model` inside the block, keyed by checkpoint
    path: `records[name]` is a list with one array per call (generation calls the language
    model once per step). Calls with other weights are not recorded."""
    recorder = _Recorder(model.weights)
    token = _recorder.set(recorder)
    try:
        yield recorder.records
    finally:
        _recorder.reset(token)


def trace_forward(model, pixel_values, input_ids=None, attention_mask=None):
    """`model.forward` under a recording: {checkpoint path: NumPy array} for one forward pass.
    Without input_ids, the prompt is what generation starts from: the `<image>` ids and BOS."""
    if input_ids is None:
        start = [model.config.image_token_index] * model.config.num_query_tokens + [model.config.text.bos_token_id]
        input_ids = np.tile(np.asarray(start, dtype=np.int64), (pixel_values.shape[0], 1))
    with recording(model) as records:
        model.forward(pixel_values, input_ids, attention_mask)
    return {name: to_numpy(arrays[0]) for name, arrays in records.items()}


def trace(model, image, prompt=None):
    """One image (path, PIL image or array) and an optional prompt through the processor, then
    `trace_forward`: the intermediates of the forward pass that generation starts with."""
    if prompt is None:
        return trace_forward(model, model._need_processor()(images=[image])["pixel_values"])
    inputs = model._need_processor()(images=[image], text=[prompt])
    return trace_forward(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
