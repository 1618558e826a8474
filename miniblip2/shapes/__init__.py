"""The shapes world (world.py: scenes of coloured shapes with their captions and questions) and
the model shipped for it (shipped.py). Not the model: a small, checkable task to train and test on."""

from .world import *  # noqa: F403 -- `miniblip2.shapes.sample(seed)`, `shapes.HELD_OUT_SEEDS`, ...
