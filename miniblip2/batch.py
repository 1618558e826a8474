"""Many images to a JSON Lines file: `miniblip2 caption photos/ --output captions.jsonl`.

    image_files(specs)       folders, glob patterns and files -> image paths, in a stable order
    read_requests(file, ...) a JSONL of {"image": ..., "prompt": ...} -> [Request], one per line
    captioner / answerer / matcher
                             a loaded model -> a function from a batch of Requests to their results
    write_jsonl(requests, output, work, settings, batch_size)
                             the run: batches through `work`, one line per image, flushed as it goes

The output is its own record of progress. Each line names the image and its input (prompt,
question or texts), the result ("text", or "error" for an image that could not be read) and the
settings it was made with:

    {"image": "photos/cat.jpg", "prompt": "a photo of", "text": "a cat on a sofa",
     "weights": "Salesforce/blip2-opt-2.7b", "dtype": "float32", "max_new_tokens": 30}

A rerun skips every image that already has a result line, so an interrupted run resumes (error
lines are tried again; the last line for an image is the one that counts). A file made with
other settings is refused rather than mixed. Lines are written whole: Ctrl-C waits for the line
being written, and a line cut short by a crash (a kill, a power cut) is dropped on the next run.
"""

import glob
import json
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ImageError, MiniBlip2Error, NonFiniteError, PromptError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Request:
    image: str  # as the output names it: the path as given, found in a folder, or written in --prompts
    path: str  # where to open it (a --prompts line's relative path is relative to that file)
    inputs: tuple = ()  # (("prompt", "a photo of"),): the request's own input, as (name, value) pairs

    def key(self):  # what a rerun recognizes a finished line by
        return self.image, json.dumps(dict(self.inputs), sort_keys=True)


# DIR: its image files, recursively, sorted; a glob pattern ("photos/**/*.jpg", quoted so the
# shell leaves it): its matches, sorted; anything else: a file (one that cannot be read becomes
# an error line, not a stop). A folder or pattern that finds nothing is a mistake: said at once.
def image_files(specs) -> list[str]:
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif not os.path.lexists(spec) and any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        else:
            found = [spec]
        if not found:
            raise ImageError(f"{spec} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); give a folder, "
                             "a quoted glob pattern or image files")
        paths += found
    return paths


def requests_for(paths, **inputs) -> list[Request]:
    pairs = tuple((name, value) for name, value in inputs.items() if value is not None)
    return [Request(path, path, pairs) for path in paths]


# --prompts FILE: one JSON object a line, {"image": "cat.jpg", "prompt": "a photo of"}; `field` is
# the input the command takes ("prompt", "question" or "texts"; "prompt" is accepted for any),
# `default` what a line without it gets. Image paths are relative to the file's folder.
def read_requests(file, field, default=None) -> list[Request]:
    file = Path(file)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptError(f"--prompts {file} cannot be read ({err}); give a JSON Lines file") from err
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise PromptError(f"{file}:{number} is not JSON ({err}); write one object a line") from err
        value = entry.get(field, entry.get("prompt", default)) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not valid_input(field, value):
            raise PromptError(f"{file}:{number} must be an object with an \"image\" path and " + (
                f"a \"{field}\"" if default is None and field != "prompt" else f"optionally a \"{field}\"") +
                f" ({'a list of str' if field == 'texts' else 'a str'}); got {line[:80]}")
        path = entry["image"] if os.path.isabs(entry["image"]) else str(file.parent / entry["image"])
        inputs = () if value is None else ((field, tuple(value) if field == "texts" else value),)
        requests.append(Request(entry["image"], path, inputs))
    if not requests:
        raise PromptError(f"--prompts {file} holds no lines; write one {{\"image\": ..., \"{field}\": ...}} a line")
    return requests


def valid_input(field, value) -> bool:
    if field == "texts":
        return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, str) for t in value)
    return isinstance(value, str) or (value is None and field == "prompt")


# --- the work: a batch of Requests -> one result dict per Request --------------------------

def captioner(model, max_new_tokens=30, **generate_kwargs):
    """model.caption over a batch; images with a prompt and without one go in separate calls."""
    def work(requests):
        results = [None] * len(requests)
        for with_prompt in (False, True):
            part = [i for i, r in enumerate(requests) if ("prompt" in dict(r.inputs)) == with_prompt]
            if part:
                prompts = [dict(requests[i].inputs)["prompt"] for i in part] if with_prompt else None
                texts = model.caption([requests[i].path for i in part], prompt=prompts,
                                      max_new_tokens=max_new_tokens, **generate_kwargs)
                for i, text in zip(part, texts):
                    results[i] = {"text": text}
        return results
    return work


def answerer(model, max_new_tokens=30, **generate_kwargs):
    """model.answer over a batch, one question per image."""
    def work(requests):
        answers = model.answer([r.path for r in requests], [dict(r.inputs)["question"] for r in requests],
                               max_new_tokens=max_new_tokens, **generate_kwargs)
        return [{"text": text} for text in answers]
    return work


def matcher(model):
    """retrieval.rank_texts per image: the best text, and every text's scores, best first."""
    from .retrieval import rank_texts

    def work(requests):
        rankings = [rank_texts(model, r.path, list(dict(r.inputs)["texts"])) for r in requests]
        return [{"text": ranking[0].text, "matches": [asdict(m) for m in ranking]} for ranking in rankings]
    return work


# --- the run ------------------------------------------------------------------------------

@dataclass
class Summary:
    total: int = 0  # requests asked for
    skipped: int = 0  # already in the output
    written: int = 0  # result lines written now
    errors: int = 0  # error lines written now


def write_jsonl(requests, output, work, settings, batch_size=8, progress=True) -> Summary:
    """Append a line for each request not yet in `output`: {"image", inputs..., "text" (or
    "error"), settings...}, `batch_size` images to a call of `work`, flushed after each batch."""
    from tqdm.auto import tqdm
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PromptError(f"batch size must be a positive int; got {batch_size!r}")
    unique = {}
    for request in requests:  # an image named twice (a folder and a file in it) is done once
        unique.setdefault(request.key(), request)
    requests = list(unique.values())
    done = finished_keys(Path(output), settings)
    todo = [r for r in requests if r.key() not in done]
    summary = Summary(total=len(requests), skipped=len(requests) - len(todo))
    with open(output, "a", encoding="utf-8") as out, tqdm(total=len(requests), initial=summary.skipped,
                                                          unit="img", disable=not progress, smoothing=0.1) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            results = results_or_errors(work, batch)
            lines = [json.dumps({"image": r.image, **dict(r.inputs), **result, **settings}) + "\n"
                     for r, result in zip(batch, results)]
            with interrupts_held():
                out.write("".join(lines))
                out.flush()
            errors = sum("error" in result for result in results)
            summary.written, summary.errors = summary.written + len(batch) - errors, summary.errors + errors
            bar.update(len(batch))
    return summary


# A batch that fails on one input (an unreadable image, a prompt too long, NaN scores) is run again
# one image at a time, so that only the bad ones become error lines. An error of the model (a
# CheckpointError: it cannot do this) or a bug stops the run.
INPUT_ERRORS = (ImageError, PromptError, NonFiniteError)


def results_or_errors(work, batch) -> list[dict]:
    try:
        return work(batch)
    except INPUT_ERRORS as err:
        if len(batch) == 1:
            return [{"error": " ".join(str(err).split())}]
        return [result for request in batch for result in results_or_errors(work, [request])]


NOT_SETTINGS = ("image", "prompt", "question", "texts", "text", "matches", "error")


# The keys of the result lines already in `output`, after dropping a last line cut short by a
# crash. Lines made with other settings stop the run: a file answers one set of settings.
def finished_keys(output: Path, settings) -> set:
    if not output.exists():
        return set()
    data = drop_cut_line(output)
    done = set()
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            inputs = {k: tuple(v) if k == "texts" else v for k, v in entry.items()
                      if k in ("prompt", "question", "texts")}
            key = Request(entry["image"], "", tuple(inputs.items())).key()
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise MiniBlip2Error(f"{output}:{number} is not a line miniblip2 wrote ({line[:80]!r}); give another "
                                 "--output file") from err
        made_with = {k: v for k, v in entry.items() if k not in NOT_SETTINGS}
        if made_with != settings:
            changed = ", ".join(f"{k} {made_with.get(k)!r} there, {settings.get(k)!r} now"
                                for k in sorted(set(made_with) | set(settings)) if made_with.get(k) != settings.get(k))
            raise MiniBlip2Error(f"{output}:{number} was made with other settings ({changed}); rerun with the same "
                                 "settings to resume it, or give another --output file")
        if "error" not in entry:
            done.add(key)
    return done


def drop_cut_line(output: Path) -> bytes:
    data = output.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):  # a last line with no newline: a write that a crash cut short
        if not data[cut:].startswith(b'{"image": '):
            raise MiniBlip2Error(f"{output} does not end in a line miniblip2 wrote; give another --output file")
        with open(output, "r+b") as f:
            f.truncate(cut)
    return data[:cut]


# Ctrl-C (SIGINT) during the block is held until it ends, then raised: a line is never half
# written. Only the main thread can set signal handlers; elsewhere the block runs as it is.
@contextmanager
def interrupts_held():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if held:
            raise KeyboardInterrupt
