"""Hugging Face hub ids -> a checkpoint folder: `miniblip2.load("Salesforce/blip2-opt-2.7b")`.

transformers' `from_pretrained("Salesforce/blip2-opt-2.7b")` looks in the hub cache and
downloads what is missing; this does the same through `huggingface_hub`, the library that
writes and reads that cache (~/.cache/huggingface/hub, moved by $HF_HOME or $HF_HUB_CACHE):

    resolve(name)     a local path as it is; else a hub id -> its snapshot folder in the cache:
                      the cache first (no network), then a download, unless HF_HUB_OFFLINE=1
    download(id, to)  `miniblip2 download ID [--dir DIR]`: ask the hub, fetch what is new
    needed_files      which of a repository's files miniblip2 reads, from the hub's listing

Only what the model reads is fetched: the configs, the tokenizer and processor files, and the
weights as safetensors, never the `pytorch_model*.bin` copies most repositories also hold (half
of what a full clone of blip2-opt-2.7b would fetch). A repository with no safetensors (some
BLIP ones) gets its .bin files, which miniblip2 reads through a pickle allowlist (torch_bin.py).

A path that exists always wins over a hub id of the same spelling: `weights/shapes-tiny` is the
folder. A cached snapshot with config.json, every weight file and a tokenizer is used without
asking the hub whether it changed; `miniblip2 download ID` asks, and fetches a newer revision.
"""

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .checkpoint.paths import HUB_ID
from .errors import CheckpointError

# The files beside the weights that a checkpoint folder may hold and miniblip2 may read
# (checkpoint/config.py, processor.py, tokenizer.py; generation_config.json for a reader).
SUPPORT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model")
# The weights, as transformers' save_pretrained names them: one file, or shards and an index.
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", re.compile(r"model-\d+-of-\d+\.safetensors"))
TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json", re.compile(r"pytorch_model-\d+-of-\d+\.bin"))


def is_hub_id(name) -> bool:
    """A str spelled like "owner/name" with nothing at that path here (a local folder wins)."""
    if not isinstance(name, (str, os.PathLike)) or isinstance(name, bytes):
        return False
    text = os.fspath(name)
    if not isinstance(text, str) or not HUB_ID.match(text) or os.path.lexists(text):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(text)  # no "--" or "..", at most 96 characters
    except HFValidationError:
        return False
    return True


def resolve(name, progress=True):
    """`name` itself, unless it is a hub id (see is_hub_id); then its snapshot folder (a Path),
    from the cache or downloaded into it."""
    if not is_hub_id(name):
        return name
    repo_id = os.fspath(name)
    cached, missing = cached_snapshot(repo_id)
    if cached is not None and not missing:
        return cached
    if offline():
        raise CheckpointError(offline_message(repo_id, cached, missing))
    return Path(fetch(repo_id, local_dir=None, progress=progress))


# `miniblip2 download ID [--dir DIR]`: always asks the hub (so a newer revision comes down);
# offline, a complete cached copy is reported instead.
def download(repo_id, local_dir=None, progress=True) -> Path:
    if not isinstance(repo_id, str) or not HUB_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hugging Face hub id; give one as owner/name, "
                              "e.g. Salesforce/blip2-opt-2.7b")
    if offline():
        cached, missing = cached_snapshot(repo_id)
        if local_dir is None and cached is not None and not missing:
            return cached
        raise CheckpointError(offline_message(repo_id, cached, missing))
    return Path(fetch(repo_id, local_dir, progress))


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)  # $HF_HUB_OFFLINE, as huggingface_hub read it at import


def cache_folder() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


# The cache's snapshot of refs/main, and what it lacks of a loadable checkpoint: (None, [...]) when
# nothing of the repository is cached. huggingface_hub finds the folder (refs/main -> snapshots/).
def cached_snapshot(repo_id):  # -> (Path | None, [missing file names])
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):  # None: not cached; _CACHED_NO_EXIST: the hub said it has none
        return None, ["config.json"]
    folder = Path(config).parent
    return folder, missing_files(folder)


def missing_files(folder: Path) -> list[str]:
    """What `folder` lacks to load: weights (every shard its index names), a tokenizer."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    for single, index, _ in (SAFETENSORS, TORCH_BIN):
        if (folder / single).is_file():
            break
        if (folder / index).is_file():
            missing += [name for name in sorted(set(shard_names(folder / index))) if not (folder / name).is_file()]
            break
    else:
        missing.append(f"{SAFETENSORS[0]} (or shards, or {TORCH_BIN[0]})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    return missing


def shard_names(index_path: Path) -> list[str]:
    try:
        return list(json.loads(index_path.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"the shards that {index_path.name} names (it cannot be read)"]


def needed_files(repo_files) -> list[str]:
    """The files of a repository (the hub's listing) that miniblip2 reads: support files and one
    copy of the weights, safetensors when there are any, else the .bin files."""
    top = [name for name in repo_files if "/" not in name]  # subfolders hold other formats (onnx/, ...)
    weights = []
    for single, index, shard in (SAFETENSORS, TORCH_BIN):
        weights = [single] if single in top else [name for name in top if name == index or shard.fullmatch(name)]
        if weights:
            break
    return [name for name in top if name in SUPPORT_FILES] + weights


# snapshot_download with only `needed_files`, after one quick look at the listing (repo_info fails
# at once when the hub cannot be reached). Its progress bars show on stderr.
def fetch(repo_id, local_dir=None, progress=True) -> str:
    from huggingface_hub import HfApi, snapshot_download
    with hub_errors(repo_id):
        files = [sibling.rfilename for sibling in HfApi().repo_info(repo_id).siblings or []]
    needed = needed_files(files)
    if "config.json" not in needed or not any(name.endswith((".safetensors", ".bin")) for name in needed):
        raise CheckpointError(f"{repo_id} on the Hugging Face hub has no config.json with model.safetensors or "
                              f"pytorch_model.bin at its top level ({', '.join(sorted(files)[:12]) or 'no files'}); "
                              "it is not a transformers checkpoint that miniblip2 can read")
    with hub_errors(repo_id):
        return snapshot_download(repo_id, allow_patterns=needed, local_dir=local_dir,
                                 tqdm_class=None if progress else silent_tqdm())


# huggingface_hub's errors as one CheckpointError that names the id and what to do.
@contextmanager
def hub_errors(repo_id):
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    elsewhere = (f"download it where the hub can be reached (`miniblip2 download {repo_id} --dir DIR`), copy DIR "
                 "here and give that folder")
    try:
        yield
    except GatedRepoError as err:  # before RepositoryNotFoundError, its base class
        raise CheckpointError(f"{repo_id} is not a folder here, and it is gated on the Hugging Face hub: accept its "
                              f"terms on its page, then log in (`hf auth login` or $HF_TOKEN) ({first_line(err)})"
                              ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointError(f"{repo_id} is not a folder here, nor a repository on the Hugging Face hub (a "
                              f"private one needs `hf auth login`); check the spelling ({first_line(err)})") from err
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"{repo_id} is not a folder here and could not be downloaded from the Hugging Face "
                              f"hub ({first_line(err)}); check the connection, or {elsewhere}") from err
    except Exception as err:  # the HTTP client's connection errors, which repo_info lets through
        if type(err).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
            raise
        raise CheckpointError(f"{repo_id} is not a folder here, and the Hugging Face hub could not be reached to "
                              f"download it ({type(err).__name__}: {first_line(err)}); check the connection, set "
                              f"HF_HUB_OFFLINE=1 to use only the cache ({cache_folder()}), or {elsewhere}") from err


def offline_message(repo_id, cached, missing) -> str:
    where = (f"its snapshot in the cache ({cached}) lacks {', '.join(missing)}" if cached is not None else
             f"it is not in the cache ({cache_folder()}, set by $HF_HOME or $HF_HUB_CACHE)")
    return (f"{repo_id} is not a folder here, and as a Hugging Face hub id {where}; downloads are off "
            f"(HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to download it, or download it where the hub can be "
            f"reached (`miniblip2 download {repo_id}`, or `--dir DIR` and give that folder) and copy it here")


def first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
    return Silent
