"""The failures a real user meets: each ends in one clear line and exit code 2 (130 for Ctrl-C),
nothing half-written, nothing finished thrown away -- and no silent wrong result."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import export
import model
import pretrain
import sample
import toyworld
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "concept.png")
TINY = ["--preset", "tiny", "--device", "cpu"]


def _one_error_line(capsys, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"{prog}: error:"), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def concept_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "c.pt"
    assert tune.cli(["--image", IMAGE, "--encoder", "random", "--steps", "1", "--batch-size", "2", "--out", str(path)]
                    + TINY) == 0
    return str(path)


# ---------------------------------------------------------------- silent wrong results


def _modes_of(reference: Image.Image) -> dict:
    """The grey gradient `reference` (mode L) in every single-channel mode Pillow opens."""
    a = np.asarray(reference).astype(np.int64)
    return {"L": reference, "1": reference.point(lambda x: 255 if x >= 128 else 0).convert("1"),
            "I;16": Image.fromarray((a * 257).astype(np.uint16)),
            "I": Image.fromarray((a * 257).astype(np.int32)),
            "F": Image.fromarray((a / 255.0).astype(np.float32)),
            "LA": Image.merge("LA", (reference, Image.new("L", reference.size, 255))),
            "P": reference.convert("P"), "RGB": reference.convert("RGB"), "RGBA": reference.convert("RGBA"),
            "CMYK": reference.convert("RGB").convert("CMYK")}


def test_every_image_mode_becomes_the_right_rgb_picture(tmp_path):
    ref = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)), mode="L")  # 0 .. 252
    expected = np.asarray(ref.convert("RGB")).astype(int)
    for mode, im in _modes_of(ref).items():
        path = tmp_path / f"{mode.replace(';', '_')}.{'tif' if mode in ('F', 'CMYK', 'I') else 'png'}"
        im.save(path)
        with Image.open(path) as raw:
            assert raw.mode == mode, (mode, raw.mode)  # the file really holds that mode
        got = np.asarray(data.load_image(str(path))).astype(int)
        if mode == "1":
            assert set(np.unique(got)) <= {0, 255} and (got[:, 0] == 0).all() and (got[:, -1] == 255).all()
        else:
            assert np.abs(got - expected).max() <= 2, (mode, np.abs(got - expected).max())


def test_a_placeholder_past_the_77th_token_is_an_error_not_a_silent_cut(tmp_path, concept_path, capsys):
    long_prompt = "a photo of " + "very " * 80 + "S* on the beach"
    with pytest.raises(model.PromptTooLong, match="too long"):
        model.tokenize_with_placeholder(model.build_tokenizer(), [long_prompt])
    assert sample.cli(["--concept", concept_path, "--prompt", long_prompt, "--out", str(tmp_path / "s")]) == 2
    assert "too long" in _one_error_line(capsys, "sample.py") and not (tmp_path / "s").exists()
    # A long prompt whose S* is early is only cut, with a warning that says so.
    with pytest.warns(UserWarning, match="cut off"):
        model.tokenize_with_placeholder(model.build_tokenizer(), ["a photo of S* " + "very " * 80])


def test_non_finite_concepts_and_diverging_tuning_write_nothing(tmp_path, concept_path, capsys):
    c = torch.load(concept_path, weights_only=True)
    c["lora_A"][next(iter(c["lora_A"]))][0, 0] = float("nan")
    torch.save(c, tmp_path / "nan.pt")
    assert sample.cli(["--concept", str(tmp_path / "nan.pt"), "--prompt", "a photo of S*", "--out", str(tmp_path / "s")]) == 2
    assert "NaN" in _one_error_line(capsys, "sample.py") and not (tmp_path / "s").exists()
    out = tmp_path / "div.pt"
    assert tune.cli(["--image", IMAGE, "--encoder", "random", "--lr", "1e30", "--steps", "4", "--batch-size", "2",
                     "--out", str(out)] + TINY) == 2
    assert "the loss became" in _one_error_line(capsys, "tune.py") and not out.exists()


# ---------------------------------------------------------------- bad places to write, missing weights


def test_outputs_are_checked_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(model, "load_components", no_loading)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "imgs").mkdir()
    data.synthetic_image(0, size=48).save(tmp_path / "imgs" / "dog.png")
    cases = [(tune, ["--image", IMAGE, "--encoder", "random", "--out", "/proc/nope/c.pt"] + TINY, "cannot write"),
             (tune, ["--image", IMAGE, "--encoder", "random", "--out", str(tmp_path / "adir")] + TINY, "is a folder"),
             (sample, ["--concept", "none", "--prompt", "a dog", "--out", "/proc/nope"] + TINY, "cannot write"),
             (sample, ["--concept", "none", "--prompt", "a dog", "--out", str(tmp_path / "afile")] + TINY, "is a file"),
             (evaluate, ["--images", str(tmp_path / "imgs"), "--encoder", "random", "--out", str(tmp_path / "afile")]
              + TINY, "is a file"),
             (pretrain, ["--data", "synthetic", "--out", "/proc/nope"] + TINY[:2], "cannot write"),
             (export, ["--concept", IMAGE, "--out", str(tmp_path / "x")], "not a concept")]
    for script, args, words in cases:
        assert script.cli(args) == 2, args
        assert words in _one_error_line(capsys, os.path.basename(script.__file__)), args


def test_a_missing_parent_folder_is_created_by_every_script(tmp_path, concept_path):
    out = tmp_path / "new" / "deeper" / "c.pt"
    assert tune.cli(["--image", IMAGE, "--encoder", "random", "--steps", "0", "--out", str(out)] + TINY) == 0
    assert out.is_file()
    assert sample.cli(["--concept", concept_path, "--prompt", "a photo of S*", "--num-images", "1", "--steps", "1",
                       "--out", str(tmp_path / "new2" / "s")]) == 0
    assert len(os.listdir(tmp_path / "new2" / "s")) == 2


def test_weights_that_cannot_be_had_give_one_line_with_what_to_do(tmp_path, capsys):
    missing = str(tmp_path / "no_sd15_here")
    assert tune.cli(["--image", IMAGE, "--encoder", "random", "--base", missing, "--device", "cpu",
                     "--out", str(tmp_path / "c.pt")]) == 2
    line = _one_error_line(capsys, "tune.py")
    assert f"--base {missing}" in line and "--preset tiny" in line
    (tmp_path / "imgs").mkdir()
    data.synthetic_image(0, size=48).save(tmp_path / "imgs" / "dog.png")
    assert evaluate.cli(["--images", str(tmp_path / "imgs"), "--encoder", "random", "--preset", "toy",
                         "--base", missing, "--device", "cpu", "--out", str(tmp_path / "e")]) == 2
    assert "toyworld.py" in _one_error_line(capsys, "evaluate.py")


# ---------------------------------------------------------------- Ctrl-C


def interruptible():
    """For Popen(preexec_fn=...): SIGINT back to its default in the child. A shell starts
    background jobs with SIGINT ignored, the child inherits that, and Python then installs no
    KeyboardInterrupt handler -- Ctrl-C tests would hang when the suite runs in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(cmd, ready, tmp_path, timeout=120):
    p = subprocess.Popen([sys.executable] + cmd, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), preexec_fn=interruptible)
    t0 = time.time()
    while not ready() and time.time() - t0 < timeout and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def test_ctrl_c_in_sample_exits_130_and_keeps_the_finished_images(tmp_path):
    out = tmp_path / "s"
    cmd = [os.path.join(ROOT, "sample.py"), "--concept", "none", "--prompt", "a photo of a dog", "--num-images", "500",
           "--batch-size", "1", "--steps", "5", "--out", str(out)] + TINY
    # Ready when two PNGs are *finished* (a name like x.tmp123.png is one being written).
    rc, err = _interrupt_when(cmd, lambda: out.is_dir() and sum(bool(re.fullmatch(r".*_\d\d+\.png", f))
                                                                for f in os.listdir(out)) >= 2, tmp_path)
    assert rc == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("sample.py: interrupted")
    kept = [f for f in os.listdir(out)]
    assert len(kept) >= 2 and all(re.fullmatch(r".*_\d\d+\.png", f) for f in kept)  # finished PNGs, no temp files
    for f in kept:
        with Image.open(out / f) as im:
            im.verify()


def test_ctrl_c_in_tune_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "c.pt"
    log = tmp_path / "err.txt"
    cmd = [os.path.join(ROOT, "tune.py"), "--image", IMAGE, "--encoder", "random", "--steps", "100000",
           "--batch-size", "2", "--out", str(out)] + TINY
    p = subprocess.Popen([sys.executable] + cmd, cwd=str(tmp_path), stderr=open(log, "w"), text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), preexec_fn=interruptible)
    t0 = time.time()
    while "step 2/" not in log.read_text() and time.time() - t0 < 120:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130
    err = log.read_text()
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tune.py: interrupted")
    assert not out.exists() and os.listdir(tmp_path) == ["err.txt"]


# ---------------------------------------------------------------- bad numbers, concepts, devices, paths


def test_bad_numbers_concepts_devices_and_paths_are_one_line_each(tmp_path, concept_path, capsys):
    c = torch.load(concept_path, weights_only=True)
    del c["lora_B"]
    torch.save(c, tmp_path / "nokey.pt")
    c = torch.load(concept_path, weights_only=True)
    name = next(iter(c["lora_A"]))
    c["lora_A"][name] = torch.zeros(3, 7)
    torch.save(c, tmp_path / "shape.pt")
    img_dir = tmp_path / "a_folder.png"
    img_dir.mkdir()
    common = ["--out", str(tmp_path / "o.pt")]
    cases = [(tune, ["--image", IMAGE, "--encoder", "random", "--lr", "nan"] + common + TINY, "not a finite number"),
             (tune, ["--image", IMAGE, "--encoder", "random", "--lr", "-1"] + common + TINY, "--lr must be positive"),
             (tune, ["--image", IMAGE, "--encoder", "random", "--alpha-blend", "inf"] + common + TINY, "finite"),
             (tune, ["--image", IMAGE, "--encoder", "random", "--steps", "x"] + common + TINY, "invalid int"),
             (tune, ["--image", IMAGE, "--encoder", "random", "--encoder-timestep", "-1"] + common + TINY,
              "--encoder-timestep must be in [0, 1000), got -1"),
             (tune, ["--image", IMAGE, "--encoder", "random", "--hard-token", "nearest"] + common + TINY, "invalid choice"),
             (tune, ["--image", str(img_dir), "--encoder", "random"] + common + TINY, "is a directory"),
             (sample, ["--concept", str(tmp_path / "nokey.pt"), "--prompt", "a photo of S*"], "lacks lora_B"),
             (sample, ["--concept", str(tmp_path / "shape.pt"), "--prompt", "a photo of S*"], "has A (3, 7)"),
             (sample, ["--concept", "none", "--prompt", "a dog", "--guidance", "nan", "--preset", "tiny"], "finite"),
             (export, ["--concept", str(tmp_path / "shape.pt"), "--out", str(tmp_path / "e")], "has A (3, 7)"),
             (pretrain, ["--data", "synthetic", "--out", str(tmp_path / "p"), "--val-images", f"{tmp_path},{tmp_path}/no"]
              + ["--preset", "tiny"], f"--val-images: no such folder: {tmp_path}/no"),
             (pretrain, ["--val-images", f"{tmp_path},{tmp_path}", "--val-concepts", str(tmp_path), "--preset", "tiny"],
              "needs --val-images DIR (one)")]
    if not torch.cuda.is_available():
        cases.append((tune, ["--image", IMAGE, "--encoder", "random", "--preset", "tiny", "--device", "cuda"] + common,
                      "no CUDA GPU"))
    for script, args, words in cases:
        assert script.cli(args) == 2, args
        line = _one_error_line(capsys, os.path.basename(script.__file__))
        assert words in line, (args, line)
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


def test_real_processes_print_one_line_for_a_bad_flag(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tune.py"), "--image", IMAGE, "--lr", "nan"],
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "tune.py: error: argument --lr: 'nan' is not a finite number"]


# ---------------------------------------------------------------- behaviour


def test_sample_generates_in_batches_with_the_same_pixels(tmp_path, concept_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["--concept", concept_path, "--prompt", "a photo of S*", "--num-images", "3", "--steps", "2"]
    assert sample.cli(base + ["--batch-size", "2", "--out", str(a)]) == 0
    assert sample.cli(base + ["--batch-size", "3", "--out", str(b)]) == 0
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len(names) == 4  # 3 images and the grid
    for n in names:  # the same seeds per image; batching only changes float rounding (a level or two of 255)
        diff = np.abs(np.asarray(Image.open(a / n)).astype(int) - np.asarray(Image.open(b / n)).astype(int))
        assert diff.max() <= 2, (n, diff.max())


def test_evaluate_reads_comments_and_says_it_skips_subfolders(tmp_path, capsys):
    (tmp_path / "imgs" / "more").mkdir(parents=True)
    data.synthetic_image(0, size=48).save(tmp_path / "imgs" / "dog.png")
    (tmp_path / "p.txt").write_text("# my prompts\na photo of S*\n  # another comment\n\n")
    cfg = evaluate.Config(images=str(tmp_path / "imgs"), prompts=str(tmp_path / "p.txt"), out=str(tmp_path / "o"))
    files, _, prompts = evaluate.check_inputs(cfg)
    assert files == ["dog.png"] and prompts == ["a photo of S*"]
    assert "sub-folders of --images are not searched (more)" in capsys.readouterr().err


@pytest.mark.parametrize("script", [tune, sample, evaluate, pretrain, export, toyworld])
def test_every_flag_has_help_and_required_ones_show_no_default(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    flags = re.findall(r"^  (--[a-z-]+)", text, flags=re.M)
    blocks = re.split(r"^  --", text.split("options:")[1], flags=re.M)[1:]
    assert len(blocks) == len(flags) > 3
    for block in blocks:
        words = block.split(None, 1)
        assert len(words) == 2 and len(words[1].strip()) > 10, block  # a flag, then real help text
    for req in {"tune": ["--image"], "sample": ["--prompt"], "evaluate": ["--images"],
                "export": ["--concept", "--out"]}.get(script.__name__, []):
        block = next(b for b in blocks if b.startswith(req[2:] + " "))
        assert "(required)" in block and "default" not in block


# ---------------------------------------------------------------- the README, as a newcomer runs it


def test_the_readme_offline_block_runs_exactly_as_written(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- offline-smoke-run -->\s*```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert any(c.startswith("python tune.py") for c in commands) and any(c.startswith("python export.py") for c in commands)
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "runs", "samples", "*.pt", "__pycache__", ".venv"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for cmd in commands:
        r = subprocess.run(["bash", "-c", cmd], cwd=str(work), capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
    assert (work / "concept.pt").is_file() and (work / "runs" / "pretrain" / "encoder.pt").is_file()
    assert any(f.endswith("_grid.png") for f in os.listdir(work / "samples"))
    assert (work / "runs" / "eval" / "metrics.md").is_file()
