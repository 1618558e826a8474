"""miniblip2 on many machines with Ray Data: `pip install 'miniblip2[ray]'`.

    import ray
    from miniblip2.distributed import caption_dataset, image_dataset

    ray.init()                                       # this machine; on a cluster's node: ray.init("auto")
    images = image_dataset(["photos/"])              # paths that every node can open (a shared folder)
    # or ray.data.read_images("s3://bucket/photos/", include_paths=True): Ray reads and decodes them
    captions = caption_dataset(images, weights="Salesforce/blip2-opt-2.7b", concurrency=4)
    captions.write_json("captions/")                 # rows {"image": path, "text": caption}

Ray Data cuts a dataset into blocks and streams them through `map_batches`. `Captioner` is a
callable class, so Ray makes `concurrency` actors (workers that stay up) and each one builds it
once: one model load per worker, then batch after batch of `batch_size` images. The captions are
those of `model.caption` in one process (the same code on the same images); an image that
cannot be read gives a row with "error" instead of "text", as in batch.py's JSON Lines.

`weights` is read on each worker: give a hub id (each node fetches it into its own Hugging Face
cache, or finds it there) or a folder every node has. Without it, each worker uses its own
$MINIBLIP2_WEIGHTS, else the shapes model shipped in the repository. `device="cuda"` with
`num_gpus=1` gives each worker a GPU (Ray sets CUDA_VISIBLE_DEVICES); on the CPU each worker
runs NumPy's BLAS with the threads of its `num_cpus` (Ray sets OMP_NUM_THREADS from it).
"""

import numpy as np

from .batch import Request, captioner, image_files, results_or_errors
from .families import load
from .shapes.shipped import weights_folder


class Captioner:
    """A map_batches callable: {"image": paths or decoded [H, W, 3] arrays, "path" (optional),
    "prompt" (optional, one per image)} -> {"image": names, "prompt" (if given), "text", "error"}."""

    def __init__(self, weights=None, prompt=None, max_new_tokens=30, dtype="float32", device="cpu",
                 **generate_kwargs):
        self.model = load(weights_folder(weights), dtype=dtype, device=device, progress=False)
        self.prompt = prompt
        self.work = captioner(self.model, max_new_tokens, **generate_kwargs)

    def __call__(self, batch: dict) -> dict:
        images = list(batch["image"])
        names = [str(name) for name in batch.get("path", images if all(isinstance(i, str) for i in images) else
                                                 [""] * len(images))]  # read_images(include_paths=True) has "path"
        prompts = [str(p) for p in batch["prompt"]] if "prompt" in batch else [self.prompt] * len(images)
        requests = [Request(name, image, () if prompt is None else (("prompt", prompt),))
                    for name, image, prompt in zip(names, images, prompts)]
        results = results_or_errors(self.work, requests)
        columns = {"image": names} | ({"prompt": prompts} if "prompt" in batch else {})
        columns |= {"text": [r.get("text") for r in results], "error": [r.get("error") for r in results]}
        return {name: np.array(values, dtype=object) for name, values in columns.items()}


def image_dataset(specs):
    """A Ray dataset of {"image": path} rows: folders, glob patterns and files, as the CLI takes
    them (batch.image_files). Every worker opens its paths itself, so they must be on every node."""
    import ray.data
    return ray.data.from_items([{"image": path} for path in image_files(specs)])


def caption_dataset(dataset, weights=None, batch_size=8, concurrency=1, num_cpus=1, num_gpus=0, **caption_kwargs):
    """`dataset` (rows with "image", see Captioner) captioned by `concurrency` workers, each with its
    own model; `caption_kwargs`: prompt, max_new_tokens, dtype, device and `generate`'s settings."""
    from ray.data import ActorPoolStrategy
    return dataset.map_batches(Captioner, fn_constructor_kwargs=dict(weights=weights, **caption_kwargs),
                               batch_size=batch_size, compute=ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
                               num_gpus=num_gpus, batch_format="numpy")
