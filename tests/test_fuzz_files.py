"""A fuzzer for the files people share: concept files (tune.py -> sample.py / export.py) and
encoder checkpoints (pretrain.py -> tune.py), damaged in the ways a disk, an editor or another
tool damages them -- keys dropped or added, values of another type, shape or dtype, NaN / inf /
huge numbers, layers renamed, bytes truncated or flipped.

Every damaged file goes through the real command-line entry (`sample.cli`, `export.cli`,
`tune.cli`, in this process; a few through a subprocess too) and must end in one of two ways:
exit 0 with a correct result (the images / files / concept the command promises), or exit 2
with one line on stderr and no output written. Never a traceback, never a half-written file.

The suite runs a fixed, derandomised sample of examples per file kind. A long campaign:

    DATE_FUZZ_EXAMPLES=2000 pytest -n 0 -s tests/test_fuzz_files.py -k "not subprocess"   # prints the counts
"""
import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import export
import model
import sample
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "concept.png")
N = int(os.environ.get("DATE_FUZZ_EXAMPLES", "0"))  # 0: the suite's small sample


def fuzz_settings(suite_examples: int):
    return settings(max_examples=N or suite_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ----------------------------------------------------------------------------------------
# Valid files to start from (tiny preset)


@pytest.fixture(scope="module")
def valid_concept(tiny):
    comps, names = tiny
    g = torch.Generator().manual_seed(0)
    v = comps.token_table[1000:1001].detach().clone() * 1.1
    shapes = model.lora_shapes(comps.unet, names)
    r = comps.cfg.lora_rank
    lora = {n: (torch.randn(1, i, r, generator=g) * 0.1, torch.randn(1, r, o, generator=g) * 0.01)
            for n, (i, o) in zip(names, shapes)}
    return model.make_concept(comps, v, lora, model.PLACEHOLDER, 0.25, {"method": "date"}, [1.0, 0.9])


@pytest.fixture(scope="module")
def valid_encoder(tiny):
    comps, names = tiny
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        enc = model.build_encoder(comps, names)
    return model.encoder_checkpoint(enc, comps, 0)


# ----------------------------------------------------------------------------------------
# Damage

ODD_VALUES = [None, "text", 3, -1, 2.5, True, [1.0, 2.0], {"a": 1}, torch.zeros(0), torch.tensor(1.0),
              float("nan")]
DTYPES = [torch.int64, torch.bool, torch.complex64, torch.float16, torch.bfloat16, torch.float64, torch.uint8]
NUMBERS = [float("nan"), float("inf"), -float("inf"), 1e30, 3e38, -1e6, 100.0, 0.0]
NESTED = ("lora_A", "lora_B", "encoder", "encoder_dims", "tuning", "rng", "optimizer")


def _slots(obj: dict) -> list[tuple]:
    """Every place a value lives: (key,) at the top, (key, inner key) inside the nested dicts."""
    out = [(k,) for k in obj]
    for k in NESTED:
        if isinstance(obj.get(k), dict):
            out += [(k, j) for j in obj[k]]
    return out


def _get(obj, slot):
    return obj[slot[0]] if len(slot) == 1 else obj[slot[0]][slot[1]]


def _set(obj, slot, value):
    if len(slot) == 1:
        obj[slot[0]] = value
    else:
        obj[slot[0]] = dict(obj[slot[0]])
        obj[slot[0]][slot[1]] = value


def _drop(obj, slot):
    if len(slot) == 1:
        del obj[slot[0]]
    else:
        obj[slot[0]] = dict(obj[slot[0]])
        del obj[slot[0]][slot[1]]


@st.composite
def damaged(draw, valid: dict):
    """A copy of `valid` with one to three kinds of damage, as the bytes of a file."""
    obj = copy.copy(valid)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(obj)
        if not slots:
            break
        slot = draw(st.sampled_from(slots))
        value = _get(obj, slot)
        kind = draw(st.sampled_from(["drop", "add", "type", "shape", "dtype", "number", "rename", "list"]))
        if kind == "drop":
            _drop(obj, slot)
        elif kind == "add":
            _set(obj, slot[:-1] + (f"{slot[-1]}_extra",), draw(st.sampled_from(ODD_VALUES)))
        elif kind == "type":
            _set(obj, slot, draw(st.sampled_from(ODD_VALUES)))
        elif kind == "list" and isinstance(value, torch.Tensor):
            _set(obj, slot, value.tolist())
        elif kind == "shape" and isinstance(value, torch.Tensor):
            how = draw(st.sampled_from(["cut", "grow", "transpose", "unsqueeze", "flatten"]))
            if how == "cut" and value.numel():
                value = value.reshape(-1)[: draw(st.integers(0, value.numel() - 1))]
            elif how == "grow":
                value = torch.cat([value.reshape(-1), torch.zeros(draw(st.integers(1, 40)))])
            elif how == "transpose" and value.dim() == 2:
                value = value.t().contiguous()
            elif how == "unsqueeze":
                value = value[None]
            else:
                value = value.reshape(-1)
            _set(obj, slot, value)
        elif kind == "dtype" and isinstance(value, torch.Tensor):
            _set(obj, slot, value.to(draw(st.sampled_from(DTYPES))))
        elif kind == "number":
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                value = value.clone()
                value.reshape(-1)[draw(st.integers(0, value.numel() - 1))] = draw(st.sampled_from(NUMBERS))
                _set(obj, slot, value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                _set(obj, slot, draw(st.sampled_from(NUMBERS + [10 ** 9, -5, 0])))
        elif kind == "rename" and len(slot) == 2:
            _drop(obj, slot)
            _set(obj, (slot[0], slot[1].replace(".", "_", 1) + "x"), value)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = bytearray(buf.getvalue())
    byte_damage = draw(st.sampled_from(["none", "none", "none", "none", "truncate", "flip"]))
    if byte_damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif byte_damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


def _run_cli(cli, argv, capsys, prog: str) -> tuple[int, str]:
    """Run a script's real entry point; no exception may escape it. Returns (exit code, stderr)."""
    capsys.readouterr()
    rc = cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines and lines[-1].startswith(f"{prog}: error: "), err
        assert sum(line.startswith(f"{prog}: error:") for line in lines) == 1, err
    return rc, err


def _report(prog: str, seen: dict):
    """The campaign's count (shown with pytest -s): examples that ended in exit 0 and in exit 2."""
    print(f"fuzz {prog}: {seen[0] + seen[2]} examples, {seen[0]} exit 0 with a checked result, "
          f"{seen[2]} exit 2 with one line")


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------------------
# Concept files -> sample.py and export.py


@pytest.fixture(scope="module")
def concept_strategy(valid_concept):
    return damaged(valid_concept)


def test_fuzz_damaged_concepts_through_sample_end_in_images_or_one_line(concept_strategy, tmp_path_factory, capsys):
    seen = {0: 0, 2: 0}

    @fuzz_settings(150)
    @given(data=concept_strategy)
    def check(data):
        tmp = tmp_path_factory.mktemp("s")
        path = _write(tmp, "c.pt", data)
        out = tmp / "out"
        rc, err = _run_cli(sample.cli, ["--concept", path, "--prompt", "a photo of S*", "--out", str(out),
                                        "--preset", "tiny", "--device", "cpu", "--num-images", "1", "--steps", "2"],
                           capsys, "sample.py")
        seen[rc] += 1
        if rc == 2:
            assert not out.exists() or not os.listdir(out), os.listdir(out)  # nothing written on failure
            return
        pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
        assert len(pngs) == 2  # the image and the grid
        im = np.asarray(Image.open(out / pngs[0]))
        res = model.preset_config("tiny").resolution
        assert im.shape == (res, res, 3) and im.std() > 0  # a picture of the preset's size, not a blank

    check()
    _report("sample.py", seen)
    assert seen[2] > 0 and seen[0] > 0, seen  # the sample holds both harmless and harmful damage


def test_fuzz_damaged_concepts_through_export_never_export_a_broken_concept(concept_strategy, tmp_path_factory, capsys):
    from safetensors.torch import load_file

    seen = {0: 0, 2: 0}

    @fuzz_settings(100)
    @given(data=concept_strategy)
    def check(data):
        tmp = tmp_path_factory.mktemp("e")
        path = _write(tmp, "c.pt", data)
        out = tmp / "out"
        rc, err = _run_cli(export.cli, ["--concept", path, "--out", str(out)], capsys, "export.py")
        seen[rc] += 1
        if rc == 2:
            assert not out.exists(), os.listdir(out)
            assert not [p for p in os.listdir(tmp) if p.startswith(".export-")]  # no temporary folder left
            return
        concept = model.load_concept(path)  # what was exported is a whole, valid concept...
        files = sorted(os.listdir(out))
        assert len(files) == 4
        for name in files:  # ... and every exported tensor is finite
            assert all(torch.isfinite(t.float()).all() for t in load_file(str(out / name)).values())
        emb = load_file(str(out / "learned_embeds.safetensors"))
        assert torch.equal(next(iter(emb.values())).float(), concept["v_star"].float())

    check()
    _report("export.py", seen)
    assert seen[2] > 0, seen


# ----------------------------------------------------------------------------------------
# Encoder checkpoints -> tune.py --encoder


def test_fuzz_damaged_encoder_checkpoints_through_tune_end_in_a_concept_or_one_line(valid_encoder, tmp_path_factory,
                                                                                     capsys):
    seen = {0: 0, 2: 0}

    @fuzz_settings(80)
    @given(data=damaged(valid_encoder))
    def check(data):
        tmp = tmp_path_factory.mktemp("t")
        path = _write(tmp, "encoder.pt", data)
        out = tmp / "concept.pt"
        rc, err = _run_cli(tune.cli, ["--image", IMAGE, "--encoder", path, "--out", str(out), "--preset", "tiny",
                                      "--device", "cpu", "--steps", "1", "--batch-size", "1"], capsys, "tune.py")
        seen[rc] += 1
        if rc == 2:
            assert not os.path.exists(out)
            assert os.listdir(tmp) == ["encoder.pt"]  # no temporary file either
            return
        concept = model.load_concept(str(out))  # a whole, checked concept with a finite loss
        assert np.isfinite(concept["final_loss"])

    check()
    _report("tune.py", seen)
    assert seen[2] > 0 and seen[0] > 0, seen


# ----------------------------------------------------------------------------------------
# The same, through a real process: no traceback reaches the terminal, exit 2, one line.


@pytest.mark.parametrize("script,kind", [("sample.py", "v_star"), ("export.py", "token_id"), ("tune.py", "shape")])
def test_fuzz_subprocess_sample_of_damaged_files_exits_2_with_one_line(script, kind, valid_concept, valid_encoder,
                                                                       tmp_path):
    if script == "tune.py":
        ckpt = copy.copy(valid_encoder)
        ckpt["encoder"] = dict(ckpt["encoder"])
        key = next(k for k in ckpt["encoder"] if "layer_embed" in k)
        ckpt["encoder"][key] = torch.zeros(3, 3)
        path = str(tmp_path / "encoder.pt")
        torch.save(ckpt, path)
        argv = ["--image", IMAGE, "--encoder", path, "--out", str(tmp_path / "out"), "--preset", "tiny"]
    else:
        c = copy.copy(valid_concept)
        if kind == "v_star":
            c["v_star"] = c["v_star"][:5].clone()
        else:
            c["token_id"] = 60000
        path = str(tmp_path / "c.pt")
        torch.save(c, path)
        argv = (["--concept", path, "--prompt", "a photo of S*", "--out", str(tmp_path / "out"), "--preset", "tiny"]
                if script == "sample.py" else ["--concept", path, "--out", str(tmp_path / "out")])
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), r.stderr
    expected = {"v_star": "v_star has 5 numbers", "token_id": "token_id 60000 is not a word",
                "shape": "has shape (3, 3), this model needs"}[kind]
    assert expected in lines[0] and path in lines[0]
    assert not os.path.exists(tmp_path / "out")
