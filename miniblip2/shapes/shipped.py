"""Which checkpoint to use when none is named: $MINIBLIP2_WEIGHTS, else the shipped shapes model.

weights/shapes-tiny is a small BLIP-2 trained on the shapes world (miniblip2.shapes) and kept in
the repository, so that the first caption needs no download. It knows coloured circles, squares,
triangles and diamonds, nothing else; real photos need Salesforce/blip2-opt-2.7b (a hub id that
`load` and --weights take, hub.py).
"""

import os
import sys
from pathlib import Path

from ..checkpoint.paths import user_path
from ..errors import CheckpointError

WEIGHTS_ENV = "MINIBLIP2_WEIGHTS"  # a checkpoint folder to use when none is given
SHAPES_TINY = Path(__file__).resolve().parents[2] / "weights" / "shapes-tiny"
_announced = False


def weights_folder(weights=None) -> Path:
    """`weights` if given, else $MINIBLIP2_WEIGHTS, else the shipped shapes model (said once)."""
    global _announced
    if weights is not None:  # checked as a path (not None, empty, a URL, ...); as a folder or hub id by load
        return user_path(weights, "the checkpoint folder", CheckpointError)
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    if not (SHAPES_TINY / "config.json").is_file():
        raise CheckpointError(f"no checkpoint given and the shipped one is not at {SHAPES_TINY} (it comes with a "
                              "clone of the repository); give weights=DIR or a hub id (--weights DIR|ID) or set "
                              + WEIGHTS_ENV)
    if not _announced:
        print(f"miniblip2: no weights given, using the small shapes model in {SHAPES_TINY} (it only knows "
              "coloured shapes, see miniblip2.shapes). For photos, pass weights=\"Salesforce/blip2-opt-2.7b\" "
              "(--weights Salesforce/blip2-opt-2.7b: 15 GB, downloaded once into the Hugging Face cache), a "
              f"checkpoint folder, or set {WEIGHTS_ENV}.", file=sys.stderr)
        _announced = True
    return SHAPES_TINY
