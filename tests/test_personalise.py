"""tune.py + sample.py: tuning lowers held-out loss, concept files, dual path adds nothing at B=0,
determinism, and one-line errors with exit code 2 for bad input."""
import json
import os
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import cmdline
import data
import dualpath
import model
import pretrain
import sample
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "concept.png")


def _tune(comps, names, steps=12, batch_size=4, seed=0, image=IMAGE, **kw):
    cfg = tune.Config(image=image, encoder="random", preset="tiny", steps=steps, batch_size=batch_size, seed=seed, **kw)
    enc = tune.build_tuning_encoder(None, comps, names, seed=0)
    return tune.tune_concept(comps, enc, data.load_image(image), cfg, log=lambda s: None)


@pytest.fixture(scope="module")
def concept(tiny):
    comps, names = tiny
    return _tune(comps, names, steps=2, batch_size=2)[0]


@pytest.fixture(scope="module")
def pipe(tiny):
    return sample.build_pipeline(tiny[0])


def concept_denoise_loss(comps, concept: dict, latents: torch.Tensor, seed: int) -> float:
    """Eq. (1) of a concept on given clean latents (noise, t, prompts fixed by `seed`), through
    the same dual-path step sample.py's concept takes. No gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z_t, t, _, target = model.noisy_latents(comps.noise_scheduler, latents, g)
        prompts = data.make_prompts(len(latents), random.Random(seed), concept["placeholder"])
        C, C_h = model.encode_concept_prompts(comps.text_encoder, comps.tokenizer, concept, prompts)
        kw = dualpath.dual_path_kwargs(model.concept_lora(concept), C_h, alpha=concept["alpha_blend"],
                                       lora_scale=concept["lora_scale"])
        pred = comps.unet(z_t, t, encoder_hidden_states=C, cross_attention_kwargs=kw).sample
        return torch.nn.functional.mse_loss(pred, target).item()


def test_twelve_tuning_steps_lower_the_denoising_loss_on_a_held_out_batch(tiny):
    comps, names = tiny
    img = data.load_image(IMAGE)
    held_out = tune.view_latents(comps, img, 8, seed=12345)  # other augmentations than tuning saw
    raw, _ = _tune(comps, names, steps=0)
    tuned, stats = _tune(comps, names, steps=12)
    before = sum(concept_denoise_loss(comps, raw, held_out, seed=s) for s in range(5)) / 5
    after = sum(concept_denoise_loss(comps, tuned, held_out, seed=s) for s in range(5)) / 5
    # Measured on CPU (tiny, random encoder, batch 4): 1.1218 -> 1.1098 (-1.08%). Ask for -0.7%.
    assert after < before * 0.993, (before, after)
    assert len(stats["losses"]) == 12
    assert not torch.equal(raw["v_star"], tuned["v_star"])
    # The concept records where tuning started (the raw prediction's hard token) and how far v* went.
    assert tuned["tuning"]["start_token"] == raw["token"]
    shift = ((tuned["v_star"] - raw["v_star"]).norm() / raw["v_star"].norm()).item()
    assert tuned["tuning"]["v_shift"] == pytest.approx(shift, rel=1e-5) and shift > 0


def test_tuning_keeps_the_encoder_predictions_hard_token_unless_told_to_follow_v(tiny, monkeypatch):
    comps, names = tiny
    seen = []  # the hard_ids each tuning step's dual-path prediction receives
    inner = model.dual_path_prediction
    monkeypatch.setattr(model, "dual_path_prediction",
                        lambda *a, **k: seen.append(a[8] if len(a) > 8 else k.get("hard_ids")) or inner(*a, **k))
    raw, _ = _tune(comps, names, steps=0, batch_size=2)
    # A large lr without the anchor moves v* far enough that its nearest word changes.
    kept, _ = _tune(comps, names, steps=3, batch_size=2, lr=1.0, lambda_anchor=0.0)
    assert kept["nearest_words"][0][0] != raw["token"]  # (else this test would prove nothing)
    assert kept["token"] == raw["token"] and kept["token_id"] == raw["token_id"]
    assert kept["tuning"]["hard_token"] == "encoder" and kept["tuning"]["start_token"] == raw["token"]
    assert [int(h[0]) for h in seen[-3:]] == [raw["token_id"]] * 3  # every step's C_h held v0's word
    seen.clear()
    follows, _ = _tune(comps, names, steps=3, batch_size=2, lr=1.0, lambda_anchor=0.0, hard_token="tuned")
    assert seen == [None] * 3  # each step searched v's own nearest word
    assert follows["token"] == follows["nearest_words"][0][0] != raw["token"]


def test_steps_zero_writes_the_raw_encoder_prediction(tiny):
    comps, names = tiny
    raw, stats = _tune(comps, names, steps=0)
    enc = tune.build_tuning_encoder(None, comps, names, seed=0)
    again, _ = tune.tune_concept(comps, enc, data.load_image(IMAGE), tune.Config(image=IMAGE, encoder="random", steps=0), log=lambda s: None)
    assert torch.equal(raw["v_star"], again["v_star"])
    assert all(torch.equal(b, torch.zeros_like(b)) for b in raw["lora_B"].values())  # B head starts at zero
    assert raw["final_loss"] is None and stats["losses"] == []


def test_concept_file_round_trip_and_size(tmp_path, tiny, concept):
    comps, names = tiny
    path = tmp_path / "c.pt"
    cmdline.atomic_save(concept, str(path))
    back = model.load_concept(str(path))  # weights_only=True inside
    assert {"format", "placeholder", "v_star", "token_id", "token", "lora_A", "lora_B", "rank", "lora_scale",
            "alpha_blend", "preset", "base", "tuning", "final_loss"} <= set(back)
    assert back["placeholder"] == "S*" and back["preset"] == "tiny" and back["alpha_blend"] == 0.25
    assert set(back["lora_A"]) == set(names) and back["v_star"].shape == (comps.cfg.token_dim,)
    assert torch.load(str(path), weights_only=True)["token_id"] == concept["token_id"]
    assert os.path.getsize(path) < 200_000


def test_sd15_concept_file_is_well_under_5_mb(tmp_path, sd15_meta):
    # The real writer (make_concept) at SD 1.5's sizes: 96 layers, rank 4, a 49,408 x 768 token
    # table (random here: the file's size and layout do not depend on the weights' values).
    names = dualpath.lora_layer_names(sd15_meta.unet)
    shapes = model.lora_shapes(sd15_meta.unet, names)
    g = torch.Generator().manual_seed(0)
    table = torch.nn.Embedding.from_pretrained(torch.randn(49408, 768, generator=g) * 0.4)
    comps = model.Components(preset="sd15", cfg=model.preset_config("sd15"), tokenizer=model.build_tokenizer(),
                             noise_scheduler=sd15_meta.noise_scheduler, base="sd15-folder", clip="", unet=None,
                             vae=None, text_encoder=types.SimpleNamespace(get_input_embeddings=lambda: table),
                             image_encoder=None)
    r = comps.cfg.lora_rank
    lora = {n: (torch.randn(1, din, r, generator=g), torch.randn(1, r, dout, generator=g)) for n, (din, dout) in
            zip(names, shapes)}
    v = comps.token_table[1929:1930] + 0.01  # near "dog"
    concept = model.make_concept(comps, v, lora, "S*", 0.25, {"method": "date", "steps": 12}, [1.0, 0.9])
    path = str(tmp_path / "sd15.pt")
    cmdline.atomic_save(concept, path)
    back = model.load_concept(path)  # checks keys, shapes and values
    assert len(back["lora_A"]) == 96 and back["token"] == "dog" and back["v_star"].shape == (768,)
    assert all(back["lora_A"][n].shape == (din, r) and back["lora_B"][n].shape == (r, dout)
               for n, (din, dout) in zip(names, shapes))
    size = os.path.getsize(path)
    assert 2_000_000 < size < 3_000_000, size  # ~2.4 MB: 96 layers x rank 4 in fp32, never a UNet (3.4 GB)


def test_b_zero_and_real_token_v_star_sample_equals_plain_sd_with_hard_prompt(tiny, concept, pipe):
    comps, _ = tiny
    dog = 1929
    c = dict(concept, v_star=comps.token_table[dog].detach().clone(), token_id=dog, token="dog",
             lora_B={k: torch.zeros_like(b) for k, b in concept["lora_B"].items()})
    plain = sample.generate(pipe, comps, None, "a photo of dog on the beach", num_images=2, steps=4, seed=3, output_type="np")
    for alpha in (0.0, 0.25, 1.0):
        ours = sample.generate(pipe, comps, c, "a photo of S* on the beach", num_images=2, steps=4, seed=3,
                               alpha_blend=alpha, output_type="np")
        assert np.abs(ours - plain).max() < 1e-4, alpha
    # ... whereas the tuned concept's LoRA does change the picture.
    tuned = sample.generate(pipe, comps, dict(c, lora_B=concept["lora_B"], v_star=concept["v_star"]),
                            "a photo of S* on the beach", num_images=2, steps=4, seed=3, output_type="np")
    assert np.abs(tuned - plain).max() > 1e-3


def test_same_seed_same_pixels_other_seed_or_concept_differs(tmp_path, tiny, concept, pipe):
    comps, names = tiny
    kw = dict(num_images=2, steps=3, output_type="np")
    a = sample.generate(pipe, comps, concept, "a photo of S*", seed=5, **kw)
    b = sample.generate(pipe, comps, concept, "a photo of S*", seed=5, **kw)
    c = sample.generate(pipe, comps, concept, "a photo of S*", seed=6, **kw)
    other = _tune(comps, names, steps=2, batch_size=2, seed=1, image=_other_image(tmp_path))[0]
    d = sample.generate(pipe, comps, other, "a photo of S*", seed=5, **kw)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - d).max() > 1e-3


def test_generate_on_a_unet_without_the_dual_path_installs_it_instead_of_dropping_the_concepts_lora(tiny, concept, pipe):
    """diffusers' own attention processors ignore unknown cross_attention_kwargs with a logged
    warning only: a concept drawn through them would lose its ΔW and hard prompt silently."""
    from diffusers.models.attention_processor import AttnProcessor

    comps, names = tiny
    kw = dict(num_images=1, steps=3, seed=2, output_type="np")
    big = dict(concept, lora_B={k: b + 0.5 for k, b in concept["lora_B"].items()})  # ΔW that shows
    assert dualpath.dual_path_installed(comps.unet)
    want = sample.generate(pipe, comps, big, "a photo of S*", **kw)
    try:
        comps.unet.set_attn_processor(AttnProcessor())
        assert not dualpath.dual_path_installed(comps.unet)
        got = sample.generate(pipe, comps, big, "a photo of S*", **kw)
        installed = dualpath.dual_path_installed(comps.unet)
    finally:
        dualpath.install_dual_path(comps.unet)
    assert np.abs(got - want).max() < 1e-5
    assert installed
    without = sample.generate(pipe, comps, dict(big, lora_B={k: torch.zeros_like(b) for k, b in big["lora_B"].items()}),
                              "a photo of S*", **kw)
    assert np.abs(want - without).max() > 1e-3  # the ΔW does change the picture: the comparison can fail


def _other_image(tmp_path):
    p = str(tmp_path / "other.png")
    data.synthetic_image(11, size=128).save(p)
    return p


def test_sample_cli_writes_pngs_and_grid_and_benchmark_json(tmp_path, concept, capsys):
    cpath = str(tmp_path / "c.pt")
    cmdline.atomic_save(concept, cpath)
    out = tmp_path / "imgs"
    args = ["--concept", cpath, "--prompt", "a photo of S* on the beach", "--num-images", "2", "--steps", "3",
            "--seed", "7", "--out", str(out), "--benchmark", "--device", "cpu"]
    assert sample.cli(args) == 0
    files = sorted(os.listdir(out))
    assert files == ["a-photo-of-sx-on-the-beach_s7_00.png", "a-photo-of-sx-on-the-beach_s7_01.png",
                     "a-photo-of-sx-on-the-beach_s7_grid.png"]
    assert Image.open(out / files[2]).size == (64, 32)
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["what"] == "sample" and rec["preset"] == "tiny" and rec["device"] == "cpu"
    assert rec["s_per_image"] > 0 and rec["plain_s_per_image"] > 0 and rec["peak_gb"] > 0
    # Same seed from the command line: the same pixels.
    first = np.asarray(Image.open(out / files[0]))
    assert sample.cli(args[:-3]) == 0
    assert np.array_equal(first, np.asarray(Image.open(out / files[0])))


def test_tune_cli_benchmark_json_and_concept(tmp_path, capsys):
    out = tmp_path / "c.pt"
    rc = tune.cli(["--image", IMAGE, "--encoder", "random", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                   "--out", str(out), "--benchmark", "--device", "cpu"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(lines[-1])
    assert {"what", "preset", "device", "steps", "batch_size", "encoder_s", "tune_loop_s", "total_s", "peak_gb"} <= set(rec)
    assert rec["what"] == "tune" and rec["steps"] == 2 and rec["batch_size"] == 2
    assert 0 < rec["tune_loop_s"] < rec["total_s"] and rec["peak_gb"] > 0
    concept = model.load_concept(str(out))
    assert concept["tuning"]["steps"] == 2
    # v*'s five nearest words with their cosines (Sec. 4.2), stored and printed.
    comps = model.load_components("tiny")
    want = model.nearest_words(comps.tokenizer, comps.token_table, concept["v_star"][None], k=5)[0]
    assert [tuple(w) for w in concept["nearest_words"]] == want
    assert lines[-3] == "v* reads as: " + ", ".join(f"{w} {c:.3f}" for w, c in want)
    tuned = concept["tuning"]
    assert lines[-2].startswith(f"tuning moved v* by {100 * tuned['v_shift']:.0f} % of its norm; its nearest word "
                                f"{tuned['start_token']!r} -> {want[0][0]!r}")
    assert lines[-2].endswith(f"hard token {concept['token']!r} (the encoder's)") and tuned["hard_token"] == "encoder"


def test_tune_reads_the_preset_from_a_pretrain_checkpoint(tmp_path):
    cfg = pretrain.Config(preset="tiny", data="synthetic", out=str(tmp_path / "run"), steps=1, batch_size=2,
                          num_workers=0, warmup_steps=1)
    pretrain.main(cfg)
    out = tmp_path / "c.pt"
    assert tune.cli(["--image", IMAGE, "--encoder", str(tmp_path / "run" / "encoder.pt"), "--steps", "1",
                     "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert model.load_concept(str(out))["preset"] == "tiny"
    # Asking for another preset than the checkpoint's is an error.
    assert tune.cli(["--image", IMAGE, "--encoder", str(tmp_path / "run" / "encoder.pt"), "--preset", "sd15-arch",
                     "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- bad input: exit 2, no file


def _bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "trunc.png").write_bytes(open(IMAGE, "rb").read()[:400])
    torch.save({"hello": torch.zeros(2)}, tmp_path / "notours.pt")
    return tmp_path


@pytest.mark.parametrize("case", ["missing", "empty", "text", "trunc", "no_encoder", "bad_encoder", "neg_steps",
                                  "zero_batch"])
def test_tune_bad_input_exits_2_and_writes_nothing(tmp_path, case, capsys):
    d = _bad_files(tmp_path)
    out = d / "concept.pt"
    args = {"missing": ["--image", str(d / "nope.jpg"), "--encoder", "random"],
            "empty": ["--image", str(d / "empty.jpg"), "--encoder", "random"],
            "text": ["--image", str(d / "text.png"), "--encoder", "random"],
            "trunc": ["--image", str(d / "trunc.png"), "--encoder", "random"],
            "no_encoder": ["--image", IMAGE, "--encoder", str(d / "runs" / "encoder.pt")],
            "bad_encoder": ["--image", IMAGE, "--encoder", str(d / "notours.pt")],
            "neg_steps": ["--image", IMAGE, "--encoder", "random", "--steps", "-1"],
            "zero_batch": ["--image", IMAGE, "--encoder", "random", "--batch-size", "0"]}[case]
    assert tune.cli(args + ["--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tune.py: error:") and "Traceback" not in "\n".join(err)
    assert not out.exists()
    if case == "no_encoder":
        assert "pretrain.py" in err[-1]  # says how to make one


def test_tune_failure_does_not_clobber_an_existing_concept(tmp_path):
    out = tmp_path / "concept.pt"
    out.write_bytes(b"previous")
    assert tune.cli(["--image", str(tmp_path / "nope.png"), "--encoder", "random", "--preset", "tiny", "--out", str(out)]) == 2
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["concept.pt"]


@pytest.mark.parametrize("case", ["missing_concept", "not_ours", "other_preset", "empty_prompt", "neg_steps", "zero_images"])
def test_sample_bad_input_exits_2_and_writes_nothing(tmp_path, case, concept, capsys):
    d = _bad_files(tmp_path)
    good = str(d / "c.pt")
    cmdline.atomic_save(concept, good)
    out = d / "samples"
    args = {"missing_concept": ["--concept", str(d / "nope.pt"), "--prompt", "a photo of S*"],
            "not_ours": ["--concept", str(d / "notours.pt"), "--prompt", "a photo of S*"],
            "other_preset": ["--concept", good, "--preset", "sd15", "--prompt", "a photo of S*"],
            "empty_prompt": ["--concept", good, "--prompt", "   "],
            "neg_steps": ["--concept", good, "--prompt", "a photo of S*", "--steps", "-3"],
            "zero_images": ["--concept", good, "--prompt", "a photo of S*", "--num-images", "0"]}[case]
    assert sample.cli(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sample.py: error:")
    assert not out.exists()


def test_prompt_without_placeholder_warns_once_and_still_works(tmp_path, concept, capsys):
    path = str(tmp_path / "c.pt")
    cmdline.atomic_save(concept, path)
    assert sample.cli(["--concept", path, "--prompt", "a photo of a cat", "--num-images", "3", "--batch-size", "1",
                       "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("sample.py: warning: the prompt does not mention S*") == 1  # once, not per batch
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".png")]) == 4  # 3 images + grid


def test_real_processes_exit_2_without_traceback(tmp_path):
    for cmd in (["tune.py", "--image", str(tmp_path / "nope.jpg"), "--encoder", "random", "--preset", "tiny"],
                ["sample.py", "--concept", str(tmp_path / "nope.pt"), "--prompt", "a photo of S*"]):
        cmd[0] = os.path.join(ROOT, cmd[0])
        r = subprocess.run([sys.executable] + cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_tuning_releases_the_image_tower_after_the_one_forward():
    comps = model.load_components("tiny")
    names = dualpath.install_dual_path(comps.unet)
    enc = tune.build_tuning_encoder(None, comps, names, seed=0)
    cfg = tune.Config(image=IMAGE, encoder="random", steps=1, batch_size=2)
    concept, _ = tune.tune_concept(comps, enc, data.load_image(IMAGE), cfg, release_backbone=True, log=lambda s: None)
    assert comps.image_encoder is None and concept["tuning"]["steps"] == 1
