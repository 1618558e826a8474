"""A path the user gave (a checkpoint folder, an image file) -> a Path, or one error saying what it is.

Paths arrive as str or os.PathLike from Python and from the command line. Before anything is
opened, the value itself is checked: None, an empty string (which Path would read as ".", the
current folder), bytes, a URL, a Hugging Face hub id where a folder is needed (miniblip2.load
resolves those first, hub.py), a name too long for the file system, or characters the file
system cannot encode. `kind` then says whether the path is a file, a folder or nothing, turning
the OSErrors of `stat` into the same errors.
"""

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "Salesforce/blip2-opt-2.7b"


# `what` names the argument in the message ("the checkpoint folder", "the image"); `error` is the
# MiniBlip2Error subclass to raise (CheckpointError for folders, ImageError for images).
def user_path(value, what: str, error) -> Path:
    if value is None:
        raise error(f"{what} is None; give a path (a str or pathlib.Path)")
    if isinstance(value, bytes):
        raise error(f"{what} is bytes ({value[:40]!r}); give the path as a str or pathlib.Path")
    if not isinstance(value, (str, os.PathLike)):
        raise error(f"{what} is a {type(value).__name__} ({str(value)[:40]!r}); give a path (a str or pathlib.Path)")
    text = os.fspath(value)
    if not isinstance(text, str):  # an os.PathLike that gives bytes
        raise error(f"{what} {text[:40]!r} is bytes; give the path as a str or pathlib.Path")
    if not text.strip():
        raise error(f"{what} is an empty string {text!r}; give a path")
    if "://" in text:
        raise error(f"{what} {text[:200]!r} is a URL; miniblip2 reads local files and does not download: "
                    "save the file first and give its path")
    try:
        os.fsencode(text)
    except UnicodeEncodeError as err:
        raise error(f"{what} {ascii(text)[:200]} has characters the file system cannot encode ({err.reason} at "
                    f"position {err.start}); give a valid path") from err
    return Path(text).expanduser()


# "file", "folder", "other" (a device, a socket) or None when nothing is there.
def kind(path: Path, what: str, error):
    try:
        if path.is_dir():
            return "folder"
        if path.is_file():
            return "file"
        return "other" if os.path.lexists(path) else None
    except OSError as err:  # ENAMETOOLONG, EACCES on a parent, ...
        raise error(f"{what} {ascii(str(path))[:200]} cannot be used ({err.strerror or err}); "
                    "check the path") from err


# The ending of "does not exist" for a path that looks like a hub id, reached without going through
# miniblip2.load (which resolves hub ids, hub.py): say how to get the folder.
def missing_hint(path: Path) -> str:
    if HUB_ID.match(str(path)):
        return (f"; {str(path)!r} looks like a Hugging Face hub id: miniblip2.load({str(path)!r}) and --weights "
                f"take those, or `miniblip2 download {path} --dir weights/{path.name}` gives a folder")
    return ""
