"""Which family a checkpoint belongs to, from its config.json, and loading it.

transformers' `AutoModel` picks the class named in config.json's `architectures`; so does
`miniblip2.load`. Each family is glue over the same towers (see the README's file map): the
table below is the one place that says which glue runs which class. Within a family the text
config's `model_type` picks the language model (Blip2ForConditionalGeneration: "opt" or "t5").
"""

from . import blip, blip2, blip2_retrieval, blip_retrieval, hub
from .checkpoint.config import read_config_json
from .checkpoint.loading import checkpoint_folder
from .errors import CheckpointError

# config.json `architectures[0]` -> the function that loads a folder of that class.
FAMILIES = {
    "Blip2ForConditionalGeneration": blip2.load,  # blip2-opt-*, blip2-flan-t5-*
    "Blip2ForImageTextRetrieval": blip2_retrieval.load_retrieval,  # blip2-itm-vit-g, -coco
    "Blip2TextModelWithProjection": blip2_retrieval.load_text_with_projection,
    "Blip2VisionModelWithProjection": blip2_retrieval.load_vision_with_projection,
    "Blip2Model": blip2_retrieval.load_blip2_model,
    "BlipForConditionalGeneration": blip.load_captioning,  # blip-image-captioning-base, -large
    "BlipForQuestionAnswering": blip.load_question_answering,  # blip-vqa-base, -capfilt-large
    "BlipForImageTextRetrieval": blip_retrieval.load_retrieval,  # blip-itm-base-coco, -large-coco, -flickr
    "BlipModel": blip_retrieval.load_blip_model,
    "BlipTextModel": blip_retrieval.load_text_model,
    "BlipVisionModel": blip_retrieval.load_vision_model,
}


def architecture(folder) -> str:
    values = read_config_json(folder)
    names = values.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise CheckpointError(f"{folder}/config.json has no `architectures` list ({names!r}), so the model class "
                              f"is unknown; supported: {', '.join(FAMILIES)}. Re-download config.json")
    return names[0]


# AutoModel.from_pretrained(path, dtype=...).to(device) for the classes in FAMILIES.
def load(path, dtype="float32", progress=True, device="cpu", check_finite=True):
    """The model in checkpoint folder `path` on `device` ("cpu": NumPy, "cuda": CuPy) computing in
    `dtype` ("float32", "bfloat16"; "float16" where the family allows it). Every file is checked
    at load: config, tokenizer and processor files together, and the weights for NaN and infinity
    (a read of every byte, ~1.5 s for 15 GB; `check_finite=False` skips it).

    `path` may be a hub id, "Salesforce/blip2-opt-2.7b", when no folder of that name is here: it
    is taken from the Hugging Face cache, or downloaded into it (hub.py; HF_HUB_OFFLINE=1: never)."""
    folder = checkpoint_folder(hub.resolve(path, progress))
    name = architecture(folder)
    if name not in FAMILIES:
        raise CheckpointError(f"{folder}/config.json names architecture {name!r}, which miniblip2 does not run; "
                              f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[name](folder, dtype=dtype, progress=progress, device=device, check_finite=check_finite)
