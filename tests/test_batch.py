"""Folders and lists to JSON Lines (issue #18): `caption`, `ask` and `match` with --output.

Each line's text must be what the model gives for that image alone (the shipped shapes model,
which is confident enough that a batch of 1 or 3 cannot change a greedy caption); a bad image
is an error line and the run goes on; a rerun skips what is there; Ctrl-C leaves whole lines.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import miniblip2
from miniblip2 import batch, cli, retrieval, shapes
from miniblip2.errors import MiniBlip2Error, PromptError
from miniblip2.shapes.shipped import SHAPES_TINY

SETTINGS = {"weights": str(SHAPES_TINY), "dtype": "float32", "max_new_tokens": 30}


@pytest.fixture(scope="module")
def model():
    return miniblip2.load(SHAPES_TINY)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """photos/: 5 scenes (two in a subfolder), one file that is not an image but is named .png,
    and a text file that a folder's listing leaves out."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    for i in range(5):
        shapes.sample(200 + i)[0].save(folder / ("more" if i >= 3 else "") / f"scene{i}.png")
    (folder / "broken.png").write_text("not a picture")
    (folder / "notes.txt").write_text("not listed")
    return folder


def read_lines(path):
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_folder_becomes_one_line_per_image_as_each_image_alone_would(model, scenes, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    code, _, err = run_cli(["caption", str(scenes), "--output", str(out), "--batch-size", "3"], capsys)
    assert code == 0, err
    lines = read_lines(out)
    images = sorted(str(p) for p in scenes.rglob("*.png"))
    assert [line["image"] for line in lines] == images  # sorted, recursive, .txt left out
    for line in lines:
        settings = {k: line[k] for k in SETTINGS}
        assert settings == SETTINGS
        if line["image"].endswith("broken.png"):
            assert "text" not in line and "broken.png could not be read as an image" in line["error"]
        else:
            assert line["text"] == model.caption(line["image"]) and "error" not in line
    assert "5 written, 1 error(s), 0 already done, of 6" in err and "img/s" in err  # the tqdm bar's rate


def test_a_rerun_resumes_after_the_last_whole_line(scenes, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert run_cli(["caption", str(scenes), "--output", str(out)], capsys)[0] == 0
    full = out.read_text().splitlines(keepends=True)
    assert "broken.png" in full[0]  # sorted: broken.png, more/scene3.png, more/scene4.png, scene0.png, ...
    out.write_text("".join(full[:3]) + full[3][:25])  # the error line, two results, a line a crash cut short
    code, _, err = run_cli(["caption", str(scenes), "--output", str(out), "--batch-size", "2"], capsys)
    assert code == 0 and "3 written, 1 error(s), 2 already done, of 6" in err, err
    # The cut line dropped; the error tried again; the rest appended in order.
    assert out.read_text() == "".join(full[:3] + full[:1] + full[3:])
    code, _, err = run_cli(["caption", str(scenes), "--output", str(out)], capsys)
    assert "0 written, 1 error(s), 5 already done" in err
    assert len(read_lines(out)) == 8 and read_lines(out)[-1]["image"].endswith("broken.png")


def test_other_settings_or_a_foreign_file_are_refused_not_mixed(scenes, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert run_cli(["caption", str(scenes / "more"), "--output", str(out)], capsys)[0] == 0
    before = out.read_text()
    code, _, err = run_cli(["caption", str(scenes / "more"), "--output", str(out), "--num-beams", "2"], capsys)
    assert code == 2 and "captions.jsonl:1 was made with other settings (num_beams None there, 2 now)" in err
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    code, _, err = run_cli(["caption", str(scenes / "more"), "--output", str(notes)], capsys)
    assert code == 2 and "notes.jsonl:1 is not a line miniblip2 wrote" in err
    assert out.read_text() == before and notes.read_text() == "my notes\n"


def test_globs_files_and_per_image_prompts(model, scenes, tmp_path, capsys):
    out = tmp_path / "globbed.jsonl"
    code, _, err = run_cli(["caption", str(scenes / "more" / "*.png"), str(scenes / "scene0.png"), "--output",
                            str(out), "--prompt", "Question: how many shapes are there? Answer:"], capsys)
    assert code == 0, err
    assert [(line["image"][-10:], line["prompt"][:14]) for line in read_lines(out)] == [
        ("scene3.png", "Question: how "), ("scene4.png", "Question: how "), ("scene0.png", "Question: how ")]
    questions = [q for q, _ in shapes.sample(201)[2][:3]]
    prompts = tmp_path / "prompts.jsonl"  # relative paths are relative to this file; a line without a prompt
    rel = os.path.relpath(scenes, tmp_path)
    prompts.write_text("".join(json.dumps({"image": f"{rel}/scene1.png", "prompt": q}) + "\n" for q in questions)
                       + json.dumps({"image": f"{rel}/scene2.png"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert run_cli(["caption", "--prompts", str(prompts), "--output", str(out), "--batch-size", "3"], capsys)[0] == 0
    lines = read_lines(out)
    assert [line["image"] for line in lines] == [f"{rel}/scene1.png"] * 3 + [f"{rel}/scene2.png"]
    for line, question in zip(lines, questions):
        assert line["prompt"] == question and line["text"] == model.caption(scenes / "scene1.png", prompt=question)
    assert "prompt" not in lines[3] and lines[3]["text"] == model.caption(scenes / "scene2.png")


def test_ask_writes_answers(model, scenes, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    question = "how many shapes are there?"
    code, _, err = run_cli(["ask", str(scenes / "more"), str(scenes / "scene0.png"), question, "--output", str(out)],
                           capsys)
    assert code == 0, err
    for line in read_lines(out):
        assert line["question"] == question and line["text"] == model.answer(line["image"], question)
    prompts = tmp_path / "questions.jsonl"
    prompts.write_text(json.dumps({"image": str(scenes / "scene1.png"), "question": "is there a cross?"}) + "\n" +
                       json.dumps({"image": str(scenes / "scene1.png")}) + "\n")
    out = tmp_path / "more.jsonl"
    assert run_cli(["ask", "--prompts", str(prompts), question, "--output", str(out)], capsys)[0] == 0
    assert [line["question"] for line in read_lines(out)] == ["is there a cross?", question]


def test_match_writes_rankings(scenes, tmp_path, tmp_path_factory, capsys):
    from test_retrieval import MODELS, randomised, write_processor_files
    folder = tmp_path_factory.mktemp("itm")
    cls, config = MODELS["itm"]
    randomised(cls(config)).save_pretrained(folder)
    write_processor_files(folder, with_placeholders=False)
    out = tmp_path / "matches.jsonl"
    texts = ["a red circle", "two squares", "nothing"]
    code, _, err = run_cli(["match", str(scenes / "more"), *texts, "--weights", str(folder), "--output", str(out)],
                           capsys)
    assert code == 0, err
    matcher = miniblip2.load(folder)
    for line in read_lines(out):
        expected = retrieval.rank_texts(matcher, line["image"], texts)
        assert line["texts"] == texts and line["text"] == expected[0].text
        assert [m["text"] for m in line["matches"]] == [m.text for m in expected]
        assert [m["probability"] for m in line["matches"]] == pytest.approx([m.probability for m in expected],
                                                                            abs=1e-6)  # float32 through JSON
    code, _, err = run_cli(["match", str(scenes / "more"), "a cat", "--output", str(tmp_path / "x.jsonl")], capsys)
    assert code == 2 and "Blip2ForConditionalGeneration, which writes text but cannot score" in err  # stops


@pytest.mark.parametrize("argv, message", [
    (["caption", "--output", "x.jsonl"], "caption --output needs images"),
    (["caption", "a.png", "--prompts", "p.jsonl"], "--prompts needs --output FILE"),
    (["caption", "a.png", "--batch-size", "4"], "--batch-size needs --output FILE"),
    (["ask", "a.png", "--output", "x.jsonl"], "ask --output needs images and a question"),
    (["match", "a.png", "--output", "x.jsonl"], "match --output needs images and texts"),
    (["caption", "{tmp}/empty", "--output", "x.jsonl"], "empty holds no image files"),
    (["caption", "{tmp}/*.gif", "--output", "x.jsonl"], r"\*.gif holds no image files"),
    (["caption", "a.png", "--output", "{tmp}/out.jsonl", "--batch-size", "0"], "--batch-size must be a positive int"),
    (["caption", "a.png", "--prompts", "{tmp}/p.jsonl", "--output", "x.jsonl"], "give the images either on"),
    (["caption", "--prompts", "{tmp}/p.jsonl", "--output", "x.jsonl"], r"p.jsonl:2 must be an object with an "
                                                                       r"\"image\" path and optionally a \"prompt\""),
    (["ask", "--prompts", "{tmp}/p.jsonl", "--output", "x.jsonl"], r"p.jsonl:1 must be .* and a \"question\""),
    (["caption", "--prompts", "{tmp}/none.jsonl", "--output", "x.jsonl"], "none.jsonl cannot be read"),
    (["caption", "a.png", "--output", "{tmp}", "--batch-size", "1"], "cannot write"),
])
def test_bad_batch_requests_are_one_line_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.jsonl").write_text('{"image": "a.png"}\n{"image": 3}\n')
    code, _, err = run_cli([arg.replace("{tmp}", str(tmp_path)) for arg in argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) in (1, 2), err  # 2: the shapes model's notice first
    assert err.strip().splitlines()[-1].startswith("miniblip2: error: ")
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()  # refused before anything is written


def test_an_interrupt_waits_for_the_line_being_written():
    with pytest.raises(KeyboardInterrupt), batch.interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        reached = True  # the interrupt came in the block, and was held until it ended
    assert reached


def test_ctrl_c_leaves_whole_lines_and_the_rerun_finishes(scenes, tmp_path):
    """A real run of the command in its own process, interrupted after its first lines."""
    out = tmp_path / "captions.jsonl"
    argv = [sys.executable, "-m", "miniblip2.cli", "caption", str(scenes), str(scenes / "more" / "*.png"),
            str(scenes / "scene*.png"), "--output", str(out), "--batch-size", "1", "--max-new-tokens", "12"]
    env = {k: v for k, v in os.environ.items() if k != "MINIBLIP2_WEIGHTS"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_text().count("\n") < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"miniblip2: interrupted; {out} holds every line written so far" in err
    first = read_lines(out)  # every line whole
    assert 2 <= len(first) < 6
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = read_lines(out)
    assert lines[:len(first)] == first
    captioned = sorted(line["image"] for line in lines if "text" in line)
    assert captioned == sorted(str(p) for p in scenes.rglob("scene*.png"))  # each once
    assert {line["image"] for line in lines if "error" in line} == {str(scenes / "broken.png")}  # tried each run


def test_read_requests_reads_prompts_questions_and_texts(tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_text('{"image": "a.png", "texts": ["x", "y"]}\n\n{"image": "/abs/b.png", "prompt": ["z"]}\n')
    first, second = batch.read_requests(file, "texts")
    assert first == batch.Request("a.png", str(tmp_path / "a.png"), (("texts", ("x", "y")),))
    assert second.path == "/abs/b.png" and second.inputs == (("texts", ("z",)),)
    with pytest.raises(PromptError, match=r"p.jsonl:1 must be an object .* and a \"question\""):
        batch.read_requests(file, "question")
    assert issubclass(PromptError, MiniBlip2Error)
