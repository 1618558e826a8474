"""What the shapes model's image features hold: linear probes on the Q-Former's output.

    python scripts/probe_shapes.py                 # 5,902 scenes with 2 or 3 objects, ~20 s
    python scripts/probe_shapes.py --weights DIR

The decoder sees an image only through the projected query outputs ([8, 128] for shapes-tiny).
A ridge classifier on all of them (flattened, standardised) is trained on 80% of the scenes and
scored on the rest, for one fact at a time: the colour, size or place of the object with a given
shape ("the circle", as the questions name it), and the colour, size, shape or place of the
first, second or third object in reading order (as the captions name them). A fact the probe reads well is in
the features in a form a linear readout can use; the model's answers can only be as good.
Scenes with one object are left out: there, "the colour of the circle" is the scene's only colour.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import miniblip2  # noqa: E402
from miniblip2 import shapes  # noqa: E402
from miniblip2.shapes.shipped import SHAPES_TINY  # noqa: E402

FIRST_SEED = 5_000_000  # not a held-out seed; any scenes will do
VALUES = {"color": list(shapes.COLORS), "size": list(shapes.SIZES), "shape": list(shapes.SHAPES),
          "place": [place for row in shapes.PLACES for place in row]}


def image_features(model, seeds, batch_size=250):  # -> [N, Q * D]
    chunks = []
    for start in range(0, len(seeds), batch_size):
        images = [shapes.sample(seed)[0] for seed in seeds[start:start + batch_size]]
        chunks.append(model.image_features(model.processor(images=images)["pixel_values"]))
    features = np.concatenate(chunks)
    return features.reshape(len(features), -1)


def probe(features, labels, penalty=10.0):
    """Held-out accuracy of a ridge classifier from features [N, F] to labels [N] (ints)."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    x = np.hstack([x, np.ones((len(x), 1))])
    n = int(0.8 * len(x))
    targets = np.eye(labels.max() + 1)[labels]
    w = np.linalg.solve(x[:n].T @ x[:n] + penalty * np.eye(x.shape[1]), x[:n].T @ targets[:n])
    return float(np.mean(np.argmax(x[n:] @ w, axis=1) == labels[n:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=SHAPES_TINY)
    parser.add_argument("--scenes", type=int, default=9000, help="drawn; those with 2 or 3 objects are probed")
    args = parser.parse_args(argv)
    model = miniblip2.load(args.weights, progress=False)
    seeds = [s for s in range(FIRST_SEED, FIRST_SEED + args.scenes) if len(shapes.objects(s)) > 1]
    objects = [shapes.objects(seed) for seed in seeds]
    features = image_features(model, seeds)
    print(f"{len(seeds)} scenes with 2 or 3 objects; features {features.shape[1]} wide; held-out accuracy:")

    def report(attribute, label, found):  # found: (scene index, that object) pairs
        index = np.array([i for i, _ in found])
        labels = np.array([VALUES[attribute].index(getattr(o, attribute)) for _, o in found])
        print(f"  {attribute:5s} of {label:17s} {probe(features[index], labels):.2f}  ({len(found) - int(0.8 * len(found))} held out)")

    for shape in shapes.SHAPES:  # as the questions ask: "what color is the circle?"
        found = [(i, o) for i, scene in enumerate(objects) for o in scene if o.shape == shape]
        for attribute in ("color", "size", "place"):
            report(attribute, f"the {shape}", found)
    for k, nth in enumerate(("first", "second", "third")):  # as the captions name them, in reading order
        found = [(i, scene[k]) for i, scene in enumerate(objects) if len(scene) > k]
        for attribute in ("color", "size", "shape", "place"):
            report(attribute, f"the {nth} object", found)


if __name__ == "__main__":
    main()
