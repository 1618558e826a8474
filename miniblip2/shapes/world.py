"""The "shapes" world: small scenes of coloured shapes, each with its true caption and questions.

The model shipped in weights/shapes-tiny was trained on these scenes (scripts/train_shapes.py),
so that captioning works with no download and the tests can check trained weights end to end.

    image, caption, qa_pairs = miniblip2.shapes.sample(7)
    caption   "a small yellow triangle above a large blue circle"
    qa_pairs  [("Question: what color is the triangle? Answer:", "yellow"), ...]

A seed is a scene: `sample(seed)` draws everything from it, the same on every machine. Training
used seeds below HELD_OUT_SEEDS.start; accuracy is measured on seeds from HELD_OUT_SEEDS.

The world: a 96 x 96 picture cut into a 3 x 3 grid of cells. One to three objects, each a
different shape, sit in different cells. Each object has a colour, a size and a shape:
    caption, one object     "a large red circle"
    two objects             "a large red circle above a small blue square" (the first is higher)
                            "a large red circle to the left of a small blue square" (same row)
    three objects           "a large red circle, a small blue square and a small green cross"
Objects are always named in reading order (top row first, then left to right).

Each object sits in the middle of its cell, and the cells line up with the shipped model's
16 px patches (2 x 2 patches a cell): a shape of a given size is the same pattern of pixels in
every cell, so what the model has to learn is the shapes, not where in a patch they fall.
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 3  # 3 x 3 cells of 32 px
SUPERSAMPLE = 4  # drawn 4x larger, then shrunk: smooth edges
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 20)}
COLOR_JITTER = 15  # each channel moves by up to this much, so colours are not one exact value
SIZES = {"small": (12, 16), "large": (22, 28)}  # side of the bounding box in px, inclusive
PLACES = (("top left", "top", "top right"), ("left", "center", "right"),
          ("bottom left", "bottom", "bottom right"))  # PLACES[row][column]
NUMBERS = ("one", "two", "three")
HELD_OUT_SEEDS = range(1_000_000_000, 1_100_000_000)  # never drawn by training


@dataclass(frozen=True)
class Shape:
    shape: str  # "circle"
    color: str  # "red"
    size: str  # "large"
    row: int  # 0 top .. 2 bottom
    column: int  # 0 left .. 2 right

    @property
    def words(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    @property
    def place(self) -> str:
        return PLACES[self.row][self.column]


def sample(seed: int) -> tuple[Image.Image, str, list[tuple[str, str]]]:
    """One scene: (96 x 96 RGB image, its caption, [(question prompt, answer), ...])."""
    rng = random.Random(seed)
    objects = draw_objects(rng)
    qa_pairs = questions(objects, rng)
    return render(objects, rng), caption(objects), qa_pairs


def objects(seed: int) -> list[Shape]:
    """The objects of scene `seed`, as `sample(seed)` draws them (they are its first draws)."""
    return draw_objects(random.Random(seed))


def draw_objects(rng: random.Random) -> list[Shape]:
    """One to three objects with different shapes in different cells, in reading order."""
    count = rng.randint(1, 3)
    cells = sorted(rng.sample(range(GRID * GRID), count))  # sorted = reading order
    shapes = rng.sample(SHAPES, count)
    return [Shape(shape, rng.choice(list(COLORS)), rng.choice(list(SIZES)), cell // GRID, cell % GRID)
            for shape, cell in zip(shapes, cells)]


def caption(objects: list[Shape]) -> str:
    if len(objects) == 1:
        return objects[0].words
    if len(objects) == 2:
        first, second = objects
        relation = "above" if first.row < second.row else "to the left of"
        return f"{first.words} {relation} {second.words}"
    return ", ".join(o.words for o in objects[:-1]) + f" and {objects[-1].words}"


def questions(objects: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    """Colour, size and place of every object, how many there are, and one shape that is there
    and one that is not."""
    pairs = []
    for o in objects:
        pairs += [(f"what color is the {o.shape}?", o.color), (f"what size is the {o.shape}?", o.size),
                  (f"where is the {o.shape}?", o.place)]
    present = [o.shape for o in objects]
    absent = [s for s in SHAPES if s not in present]
    pairs += [("how many shapes are there?", NUMBERS[len(objects) - 1]),
              (f"is there a {rng.choice(present)}?", "yes"), (f"is there a {rng.choice(absent)}?", "no")]
    return [(f"Question: {q} Answer:", a) for q, a in pairs]


def render(objects: list[Shape], rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(215, 250) for _ in range(3))
    big = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, background)
    pen = ImageDraw.Draw(big)
    for o in objects:
        fill = tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[o.color])
        side = rng.randint(*SIZES[o.size])
        left, top = centre_in_cell(o, side)
        draw_shape(pen, o.shape, [SUPERSAMPLE * v for v in (left, top, left + side, top + side)], fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def centre_in_cell(o: Shape, side: int) -> tuple[float, float]:
    """The top-left corner of a side x side box in the middle of the object's cell."""
    cell = IMAGE_SIZE / GRID
    return o.column * cell + (cell - side) / 2, o.row * cell + (cell - side) / 2


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, box: list[float], fill) -> None:
    left, top, right, bottom = box
    middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(middle_x, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "cross":
        arm = (right - left) / 6  # half the width of each bar
        pen.rectangle([middle_x - arm, top, middle_x + arm, bottom], fill=fill)
        pen.rectangle([left, middle_y - arm, right, middle_y + arm], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}")


def corpus(seeds) -> list[str]:
    """Every text the model sees for these scenes: captions, and questions with their answers."""
    texts = []
    for seed in seeds:
        _, scene_caption, qa_pairs = sample(seed)
        texts += [scene_caption] + [f"{q} {a}" for q, a in qa_pairs]
    return texts


@dataclass
class Evaluation:
    """Predictions and exact-match accuracy on some scenes (see `evaluate`)."""
    seeds: list[int]
    captions: list[str]  # one predicted caption per scene
    answers: list[list[str]]  # the predicted answer to each of the scene's questions
    caption_accuracy: float  # share of scenes whose caption is exactly right
    vqa_accuracy: float  # share of all questions answered exactly right


def evaluate(model, seeds, batch_size: int = 64, max_new_tokens: int = 24) -> Evaluation:
    """Caption every scene and answer every question with greedy search, and score them.
    `model` is anything with miniblip2's `caption(images, prompt=..., max_new_tokens=...)`."""
    def in_batches(images, prompts=None):
        texts = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            texts += model.caption(images[chunk], prompt=None if prompts is None else prompts[chunk],
                                   max_new_tokens=max_new_tokens)
        return texts

    seeds = list(seeds)
    scenes = [sample(seed) for seed in seeds]
    captions = in_batches([image for image, _, _ in scenes])
    asked = [(image, question) for image, _, qa_pairs in scenes for question, _ in qa_pairs]
    replies = in_batches([image for image, _ in asked], [question for _, question in asked])
    answers, start = [], 0
    for _, _, qa_pairs in scenes:
        answers.append(replies[start:start + len(qa_pairs)])
        start += len(qa_pairs)
    right_captions = sum(p == truth for p, (_, truth, _) in zip(captions, scenes))
    right_answers = sum(p == a for row, (_, _, qa_pairs) in zip(answers, scenes) for p, (_, a) in zip(row, qa_pairs))
    return Evaluation(seeds, captions, answers, right_captions / len(scenes), right_answers / len(asked))
