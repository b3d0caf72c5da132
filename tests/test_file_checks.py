"""Files checked against the model they meet: a concept against the text encoder and UNet it is
applied to, an encoder checkpoint against the backbones (tune.py) and the run it resumes
(pretrain.py), and files that are not ours (a LoRA or textual-inversion file from another tool,
a concept of another preset). Each ends in one line naming the file, the key and what was
expected, exit 2, nothing written. (tests/test_fuzz_files.py throws generated damage at the same
checks.)"""
import copy
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import export
import model
import pretrain
import sample
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "concept.png")


def _error(capsys, prog: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert err and err[-1].startswith(f"{prog}: error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def concept(tiny):
    comps, names = tiny
    shapes = model.lora_shapes(comps.unet, names)
    r = comps.cfg.lora_rank
    g = torch.Generator().manual_seed(0)
    lora = {n: (torch.randn(1, i, r, generator=g) * 0.1, torch.randn(1, r, o, generator=g) * 0.01)
            for n, (i, o) in zip(names, shapes)}
    return model.make_concept(comps, comps.token_table[1000:1001].detach().clone(), lora, model.PLACEHOLDER, 0.25,
                              {"method": "date"}, [1.0])


@pytest.fixture(scope="module")
def encoder_ckpt(tiny):
    comps, names = tiny
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model.encoder_checkpoint(model.build_encoder(comps, names), comps, 0)


def _sample(path, out, capsys, *extra):
    return sample.cli(["--concept", str(path), "--prompt", "a photo of S*", "--out", str(out), "--preset", "tiny",
                       "--num-images", "1", "--steps", "2", *extra])


def test_concept_v_star_of_the_wrong_width_is_one_line_naming_the_widths(concept, tmp_path, capsys):
    for n in (5, 40):  # shorter and longer than the tiny text encoder's 32
        c = dict(concept, v_star=torch.zeros(n))
        torch.save(c, tmp_path / "c.pt")
        assert _sample(tmp_path / "c.pt", tmp_path / "out", capsys) == 2
        line = _error(capsys, "sample.py")
        assert f"v_star has {n} numbers" in line and "have 32" in line and str(tmp_path / "c.pt") in line
        assert not (tmp_path / "out").exists()


def test_concept_token_id_outside_the_vocabulary_or_not_its_word_is_one_line(concept, tmp_path, capsys):
    for tid, expect in ((60000, "token_id 60000 is not a word"), (-3, "token_id must be a token id"),
                        (49407, "token_id 49407 is not a word"),
                        (concept["token_id"] + 1, f"token_id {concept['token_id'] + 1} is ")):
        torch.save(dict(concept, token_id=tid), tmp_path / "c.pt")
        assert _sample(tmp_path / "c.pt", tmp_path / "out", capsys) == 2
        line = _error(capsys, "sample.py")
        assert expect in line, line
        if tid == concept["token_id"] + 1:  # a real word, but not the one the file names
            assert f"the file names {concept['token']!r}" in line


def test_concept_lora_that_does_not_fit_this_unet_is_one_line_naming_the_layer(concept, tiny, tmp_path, capsys):
    comps, names = tiny
    name = names[0]
    d_in, d_out = model.lora_shapes(comps.unet, [name])[0]
    r = concept["rank"]
    # A and B of another projection's widths, and a layer this UNet does not have.
    for A, B, layer, expect in ((torch.zeros(d_in + 8, r), torch.zeros(r, d_out), name, f"needs ({d_in}, {r})"),
                                (torch.zeros(d_in, r), torch.zeros(r, d_out), "mid_block.attn9.to_q",
                                 "'mid_block.attn9.to_q' is not an attention projection")):
        c = dict(concept, lora_A={**concept["lora_A"], layer: A}, lora_B={**concept["lora_B"], layer: B})
        torch.save(c, tmp_path / "c.pt")
        assert _sample(tmp_path / "c.pt", tmp_path / "out", capsys) == 2
        assert expect in _error(capsys, "sample.py")


def test_export_refuses_a_damaged_concept_and_writes_nothing(concept, tmp_path, capsys):
    for damage, expect in (({"v_star": torch.zeros(5)}, "v_star has 5 numbers"),
                           ({"v_star": concept["v_star"].to(torch.complex64)}, "floating-point"),
                           ({"token_id": 10 ** 6}, "is not a word"),
                           ({"lora_B": {k: v.t() for k, v in concept["lora_B"].items()}}, "not (D_in, 2)")):
        torch.save(dict(concept, **damage), tmp_path / "c.pt")
        assert export.cli(["--concept", str(tmp_path / "c.pt"), "--out", str(tmp_path / "out")]) == 2
        assert expect in _error(capsys, "export.py")
        assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["c.pt"]
    torch.save(concept, tmp_path / "c.pt")  # the undamaged concept exports
    assert export.cli(["--concept", str(tmp_path / "c.pt"), "--out", str(tmp_path / "out")]) == 0
    assert len(os.listdir(tmp_path / "out")) == 4


def test_encoder_checkpoint_with_a_wrong_shape_or_a_nan_is_one_line_not_a_traceback_or_lower_lr(
        encoder_ckpt, tmp_path, capsys):
    key = "layer_embed"
    for value, expect in ((torch.zeros(3, 3), f"encoder['{key}'] has shape (3, 3), this model needs"),
                          (torch.full_like(encoder_ckpt["encoder"][key], float("nan")), "holds NaN or infinite")):
        ckpt = dict(encoder_ckpt, encoder={**encoder_ckpt["encoder"], key: value})
        torch.save(ckpt, tmp_path / "e.pt")
        rc = tune.cli(["--image", IMAGE, "--encoder", str(tmp_path / "e.pt"), "--out", str(tmp_path / "c.pt"),
                       "--preset", "tiny", "--steps", "2"])
        line = _error(capsys, "tune.py")
        assert rc == 2 and expect in line and str(tmp_path / "e.pt") in line, line
        assert "--lr" not in line  # the file is the cause, not the learning rate
        assert not (tmp_path / "c.pt").exists()


def test_encoder_checkpoint_of_other_layers_or_widths_is_one_line(encoder_ckpt, tmp_path, capsys):
    for damage, expect in (({"layer_names": encoder_ckpt["layer_names"][:-1]}, "layer_names but"),
                           ({"layer_names": ["x"] + encoder_ckpt["layer_names"][1:]}, "'x' is not one of them"),
                           ({"encoder_dims": {"clip_channels": 99, "unet_channels": 64}}, "clip_channels is 99"),
                           ({"step": "7"}, "step must be an int"),
                           ({"encoder": {**encoder_ckpt["encoder"], "extra.weight": torch.zeros(2)}},
                            "this model does not have, e.g. 'extra.weight'")):
        torch.save(dict(encoder_ckpt, **damage), tmp_path / "e.pt")
        rc = tune.cli(["--image", IMAGE, "--encoder", str(tmp_path / "e.pt"), "--out", str(tmp_path / "c.pt"),
                       "--preset", "tiny", "--steps", "1"])
        assert rc == 2 and expect in _error(capsys, "tune.py")


def test_files_of_other_tools_and_other_presets_say_what_they_are_and_what_to_do(concept, encoder_ckpt, tmp_path,
                                                                                 capsys):
    lora = tmp_path / "pytorch_lora_weights.safetensors"  # a diffusers LoRA (as our own export.py writes)
    save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32)}, str(lora))
    ti_st = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.zeros(768)}, str(ti_st))
    ti_bin = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": torch.zeros(768)}, ti_bin)
    a1111 = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "name": "cat"}, a1111)
    sd15 = tmp_path / "sd15-concept.pt"
    torch.save(dict(concept, preset="sd15", base=model.SD15_BASE, v_star=torch.zeros(768)), sd15)
    enc = tmp_path / "encoder.pt"
    torch.save(encoder_ckpt, enc)
    for path, expect in ((lora, "is a LoRA in safetensors format"), (ti_st, "is a textual-inversion embedding"),
                         (ti_bin, "textual-inversion embedding (diffusers format, token '<cat-toy>')"),
                         (a1111, "textual-inversion embedding (AUTOMATIC1111 format)"),
                         (enc, "is an encoder checkpoint from pretrain.py, not a concept"),
                         (sd15, "was tuned for preset 'sd15', not 'tiny': sample it with --preset sd15")):
        assert _sample(path, tmp_path / "out", capsys) == 2
        line = _error(capsys, "sample.py")
        assert expect in line and ("tune.py" in line or "load_" in line), line
    # and a concept where an encoder is expected
    torch.save(concept, tmp_path / "c.pt")
    assert tune.cli(["--image", IMAGE, "--encoder", str(tmp_path / "c.pt"), "--out", str(tmp_path / "o.pt"),
                     "--preset", "tiny"]) == 2
    assert "is a concept file from tune.py, not an encoder checkpoint" in _error(capsys, "tune.py")


def _pretrain_cfg(out, **kw):
    base = dict(preset="tiny", data="synthetic", out=str(out), steps=4, batch_size=2, lr=1e-3, warmup_steps=1,
                num_workers=0, log_every=1, save_every=2, seed=0)
    return pretrain.Config(**{**base, **kw})


def test_resume_of_a_damaged_checkpoint_is_one_line_and_auto_falls_back_to_the_newest_good_one(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.main(_pretrain_cfg(out, steps=4))  # writes encoder.pt (step 4) and encoder_0000002/4.pt
    assert sorted(p for p in os.listdir(out) if p.startswith("encoder")) == [
        "encoder.pt", "encoder_0000002.pt", "encoder_0000004.pt"]
    good4 = torch.load(out / "encoder_0000004.pt", weights_only=True)
    with open(out / "encoder.pt", "wb") as f:  # a crash mid-write of another tool: a truncated file
        f.write((out / "encoder_0000004.pt").read_bytes()[:5000])
    damaged = dict(good4, optimizer={**good4["optimizer"], "state": {0: {"exp_avg": torch.zeros(7)}}})
    torch.save(damaged, out / "encoder_0000004.pt")

    # An explicit --resume of a damaged file: one line naming the file and what is wrong.
    for path, expect in ((out / "encoder.pt", "does not load"), (out / "encoder_0000004.pt", "optimizer state[0]")):
        rc = pretrain.cli(["--preset", "tiny", "--data", "synthetic", "--out", str(out), "--steps", "6",
                           "--batch-size", "2", "--num-workers", "0", "--resume", str(path)])
        line = _error(capsys, "pretrain.py")
        assert rc == 2 and expect in line and str(path) in line, line

    # --resume auto: encoder.pt and encoder_0000004.pt are damaged, encoder_0000002.pt is good.
    pretrain.main(_pretrain_cfg(out, steps=6, resume="auto"))
    err = capsys.readouterr().err
    assert "resuming from" in err and "encoder_0000002.pt, the newest good checkpoint" in err
    assert "resumed from" in err and "at step 2" in err
    assert torch.load(out / "encoder.pt", weights_only=True)["step"] == 6

    # Nothing good left: one line that says so.
    for p in os.listdir(out):
        if p.startswith("encoder"):
            (out / p).write_bytes(b"not a checkpoint")
    rc = pretrain.cli(["--preset", "tiny", "--data", "synthetic", "--out", str(out), "--steps", "8",
                       "--batch-size", "2", "--num-workers", "0", "--resume", "auto"])
    line = _error(capsys, "pretrain.py")
    assert rc == 2 and "no good encoder_STEP.pt beside it" in line
