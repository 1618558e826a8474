"""miniblip2 on Ray Data (issue #18): a local Ray cluster of 2 CPUs, 2 workers each with its own
shapes model, must caption a folder of shapes scenes exactly as one process does, image by image.
Skipped where ray is not installed (`pip install 'miniblip2[ray]'`)."""

import pytest

import miniblip2
from miniblip2 import shapes
from miniblip2.shapes.shipped import SHAPES_TINY

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'miniblip2[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ray[data]'")
from miniblip2.distributed import caption_dataset, image_dataset  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    for seed in range(300, 308):
        shapes.sample(seed)[0].save(folder / f"scene{seed}.png")
    return folder


def test_workers_caption_as_one_process_does(cluster, scenes):
    model = miniblip2.load(SHAPES_TINY)
    expected = {str(p): model.caption(str(p)) for p in sorted(scenes.glob("*.png"))}  # one image at a time
    (scenes / "broken.png").write_text("not a picture")
    rows = caption_dataset(image_dataset([scenes]), weights=SHAPES_TINY, batch_size=3, concurrency=2).take_all()
    assert {row["image"]: row["text"] for row in rows if row["error"] is None} == expected
    (broken,) = [row for row in rows if row["error"] is not None]
    assert broken["image"].endswith("broken.png") and "could not be read as an image" in broken["error"]
    (scenes / "broken.png").unlink()


def test_images_decoded_by_ray_and_per_image_prompts(cluster, scenes):
    model = miniblip2.load(SHAPES_TINY)
    paths = sorted(scenes.glob("*.png"))[:4]
    decoded = ray.data.read_images([str(p) for p in paths], include_paths=True, mode="RGB")
    rows = caption_dataset(decoded, weights=SHAPES_TINY, batch_size=2, concurrency=1).take_all()
    by_name = {row["image"].rsplit("/", 1)[-1]: row["text"] for row in rows}  # Ray's paths, not ours
    assert by_name == {p.name: model.caption(p) for p in paths}
    question = "Question: how many shapes are there? Answer:"
    asked = ray.data.from_items([{"image": str(p), "prompt": question} for p in paths])
    rows = caption_dataset(asked, weights=SHAPES_TINY, batch_size=4).take_all()
    assert {row["image"]: (row["prompt"], row["text"]) for row in rows} == {
        str(p): (question, model.caption(p, prompt=question)) for p in paths}
