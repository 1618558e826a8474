"""Print the README's file map: every file of the package, grouped by role, with its line count.

    python scripts/file_map.py          # the Markdown table, to paste under "## The files"

The one-line descriptions live here; the counts are read from the files, so rerunning this after
a change keeps the README honest. A package file missing from GROUPS is an error.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GROUPS = {
    "Towers: the math, one file each (config defaults, weight shapes, functions)": {
        "nn.py": "primitives: linear, layer and RMS norm, GELU (erfc-based), softmax, attention; weight shapes",
        "vision.py": "the ViT of BLIP-2 (EVA ViT-g) and BLIP: patch embedding, position interpolation, pre-LN layers",
        "bert.py": "BERT's post-LN layers: embeddings, self- and cross-attention, FFN, LM head; BLIP's text model",
        "qformer.py": "the Q-Former on bert.py: 32 queries, cross-attention every other layer, the text path",
        "opt.py": "OPT decoder: positions from the mask, causal mask, KV cache; its decoder interface",
        "t5.py": "Flan-T5: RMS norm, relative position buckets, gated GELU, encoder once; its decoder interface",
    },
    "Families: which towers, in which order, which head": {
        "families.py": "config.json `architectures` -> the class that runs it; `miniblip2.load`",
        "glue.py": "what the families share: the image stage, input checks, generate/caption/stream",
        "blip2.py": "BLIP-2 captioning and VQA (Blip2ForConditionalGeneration) with OPT or T5",
        "blip2_retrieval.py": "BLIP-2 ITM and ITC (Blip2ForImageTextRetrieval), projection models, Blip2Model",
        "blip.py": "BLIP captioning (BlipForConditionalGeneration) and VQA (BlipForQuestionAnswering)",
        "blip_retrieval.py": "BLIP ITM and ITC (BlipForImageTextRetrieval), BlipModel, BlipTextModel, BlipVisionModel",
        "retrieval.py": "what matching models share: unit-length embeddings, ranking texts for an image",
    },
    "Generation: written once, for every language model": {
        "generation/loops.py": "greedy, sampling, beam search over the decoder interface; beams as batch rows",
        "generation/processors.py": "logits processors and warpers, one small function each; token choosers",
        "generation/settings.py": "generation arguments: transformers' defaults, checks, lengths, memory",
        "generation/streaming.py": "text as it is generated, never half a UTF-8 character",
        "generation/chat.py": "\"Question: ... Answer: ...\" prompts from earlier turns",
    },
    "Checkpoints: files in, arrays and settings out": {
        "checkpoint/loading.py": "the one loading pipeline: read -> check coverage -> cast -> nest -> device",
        "checkpoint/safetensors.py": "safetensors read by hand over mmap, shards, coverage check, nesting",
        "checkpoint/torch_bin.py": "pytorch_model.bin through an allowlist unpickler that only rebuilds tensors",
        "checkpoint/config.py": "config.json -> the towers' dataclasses, every field's type and range checked",
        "checkpoint/paths.py": "a user's path checked before opening (None, URLs, hub ids, unencodable names)",
        "checkpoint/image.py": "image loading (every PIL mode), resize, rescale, normalize",
        "checkpoint/tokenizer.py": "OPT byte-level BPE, T5 Unigram, BERT WordPiece through `tokenizers`",
        "checkpoint/processor.py": "Blip2Processor and BlipProcessor: `<image>` tokens, special tokens, padding",
    },
    "Runtime: where and how the math runs": {
        "runtime/device.py": "CPU (NumPy) or GPU (CuPy): the array module, moving weights once, memory",
        "runtime/precision.py": "float16 and bfloat16 the way transformers computes them",
        "runtime/trace.py": "named intermediates and attention probabilities, for the notebooks and tests",
    },
    "Using it": {
        "__init__.py": "`miniblip2.load`, `miniblip2.caption` and the public classes",
        "cli.py": "`miniblip2 caption`, `ask`, `match`, `download`, `demo`",
        "batch.py": "folders and lists of images to resumable JSON Lines, with a progress bar",
        "hub.py": "hub ids through huggingface_hub: the cache first, only the files needed",
        "distributed.py": "many machines: the model in Ray Data workers",
        "errors.py": "the error classes: one clear message that says what to do",
    },
    "Not the model: the shapes world and test fixtures": {
        "shapes/world.py": "the shapes world: scenes, captions, questions; accuracy of a model on them",
        "shapes/shipped.py": "which checkpoint when none is named: $MINIBLIP2_WEIGHTS, else shapes-tiny",
        "testing/random_checkpoint.py": "random checkpoints in the hub layout at real shapes, no download",
        "testing/tiny_tokenizer.py": "small OPT-, T5- and BERT-style tokenizers for tests and the shapes model",
    },
}
SKIPPED = {"checkpoint/__init__.py", "generation/__init__.py", "runtime/__init__.py", "shapes/__init__.py",
           "testing/__init__.py"}  # one-line package docstrings


def main():
    package = ROOT / "miniblip2"
    files = {p.relative_to(package).as_posix() for p in package.rglob("*.py")} - SKIPPED
    listed = {name for group in GROUPS.values() for name in group}
    if files - listed or listed - files:
        sys.exit(f"file map out of date: not listed {sorted(files - listed)}, gone {sorted(listed - files)}")
    lines = ["| file | lines | what |", "|---|---|---|"]
    for group, entries in GROUPS.items():
        total = sum(len((package / name).read_text().splitlines()) for name in entries)
        lines.append(f"| **{group}** | {total} | |")
        for name, what in entries.items():
            lines.append(f"| `miniblip2/{name}` | {len((package / name).read_text().splitlines())} | {what} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
