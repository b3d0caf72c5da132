"""The real-weights path and the experiments of Sec. 5: metric CLIP activation, SD 1.5 sampler
settings, Eq. (3) under DDP, v*'s starting norm, evaluation tuning like tune.py, weights
recorded with an encoder, the Sec. 5.2 regularisers, the Sec. 5.4 no-hypernet encoder, and the
Fig. 5a baselines."""
import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image

import cmdline
import data
import dualpath
import evaluate
import losses
import model
import pretrain
import sample
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "concept.png")
sys.path.insert(0, os.path.join(ROOT, "tests"))


# ---------------------------------------------------------------- real-weights bugs


def _activations(clip_model) -> set:
    return {type(m).__name__ for m in clip_model.visual.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


def test_metric_clip_has_the_activation_its_openai_weights_were_trained_with(monkeypatch):
    # open_clip's own record of the tag: OpenAI's ViT-B-16 was trained with QuickGELU.
    assert model.uses_quick_gelu("ViT-B-16", "openai", file_quick_gelu=True) is True
    assert model.uses_quick_gelu("ViT-H-14", "laion2b_s32b_b79k", file_quick_gelu=False) is False
    # Build the sd15 metric model as evaluate.py does, with the weight download swapped for none.
    calls = []
    real = open_clip.create_model

    def no_download(name, pretrained=None, **kw):
        calls.append((name, pretrained))
        return real(name, pretrained=None, **kw)

    monkeypatch.setattr(open_clip, "create_model", no_download)
    net = evaluate.metric_clip_model("sd15", "openai", "meta")
    assert calls == [("ViT-B-16", "openai")] and _activations(net) == {"QuickGELU"}
    # A local file of the OpenAI weights, and the random sd15-arch architecture, too.
    assert _activations(evaluate.metric_clip_model("sd15", __file__, "meta")) == {"QuickGELU"}
    assert _activations(evaluate.metric_clip_model("sd15-arch", "openai", "meta")) == {"QuickGELU"}
    # ...whereas open_clip's plain "ViT-B-16" (what was built before) has nn.GELU.
    assert _activations(real("ViT-B-16", pretrained=None, device="meta")) == {"GELU"}


def test_sampler_settings_never_come_from_the_scheduler_file(tmp_path):
    # An older SD 1.5 scheduler file: no clip_sample key (diffusers' default for it is True).
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "skip_prk_steps": True}))
    from diffusers import DDIMScheduler, DDPMScheduler

    assert DDIMScheduler.from_config(DDPMScheduler.load_config(str(tmp_path), subfolder="scheduler")).config.clip_sample
    train = model.load_noise_scheduler(str(tmp_path))
    ddim = model.sampling_scheduler(train)
    assert train.config.clip_sample is False and train.config.beta_schedule == "scaled_linear"
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    assert ddim.config.steps_offset == 1 and ddim.config.thresholding is False
    # The pipeline sample.py builds uses exactly that sampler.
    comps = model.load_components("tiny", with_image_encoder=False)
    comps.noise_scheduler = train
    pipe = sample.build_pipeline(comps)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.clip_sample is False
    assert pipe.safety_checker is None


def test_eq3_gradient_on_2_ranks_x_2_images_equals_1_process_x_4(tmp_path):
    import ddp_contrastive_grad

    out = tmp_path / "grads.pt"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "ddp_contrastive_grad.py"), str(out)],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    two_ranks, one_process = torch.load(out, weights_only=True), ddp_contrastive_grad.contrastive_grads()
    assert sorted(two_ranks) == sorted(one_process) and "token_head.2.weight" in one_process
    for k, g in one_process.items():
        # Detached negatives (each v* pushed only by its own rank's images) differ by ~10% here.
        assert torch.allclose(two_ranks[k], g, atol=1e-6, rtol=1e-4), k


def test_v_star_starts_at_the_token_tables_typical_norm_at_sd15_sizes(sd15_meta):
    names = dualpath.lora_layer_names(sd15_meta.unet)
    shapes = model.lora_shapes(sd15_meta.unet, names)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(49408, 768, generator=g)
    table = 0.39 * table / table.norm(dim=-1, keepdim=True)  # rows of norm 0.39
    target = model.typical_token_norm(table)
    assert target == pytest.approx(0.39, rel=1e-4)
    enc = model.TuningEncoder(sd15_meta.cfg, 1280, 1280, names, shapes, hypernet=False, token_norm=target)
    with torch.no_grad():
        for scale in (0.1, 1.0, 10.0):  # whatever the backbones' feature scale
            v, _ = enc(scale * torch.randn(4, 1280, 16, 16, generator=g), scale * torch.randn(4, 1280, 8, 8, generator=g))
            assert v.norm(dim=-1).sub(target).abs().max() < 0.15 * target, v.norm(dim=-1)
        untouched = model.TuningEncoder(sd15_meta.cfg, 1280, 1280, names, shapes, hypernet=False)
        v, _ = untouched(torch.randn(4, 1280, 16, 16, generator=g), torch.randn(4, 1280, 8, 8, generator=g))
    assert v.norm(dim=-1).min() > 3 * target  # what the head gave before: ~1.6, 4x a real token


def test_build_encoder_measures_the_norm_from_the_components_table(tiny):
    comps, names = tiny
    enc = model.build_encoder(comps, names)
    with torch.no_grad():
        v, _ = enc(torch.randn(3, 64, 7, 7), torch.randn(3, 64, 8, 8))
    target = model.typical_token_norm(comps.token_table)
    assert v.norm(dim=-1).sub(target).abs().max() < 0.15 * target


def test_evaluate_sets_up_its_models_through_tune_load_models(tmp_path, monkeypatch):
    imgs = tmp_path / "set"
    imgs.mkdir()
    data.synthetic_image(0, size=64).save(imgs / "dog_01.png")
    calls = []
    real = tune.load_models
    monkeypatch.setattr(tune, "load_models", lambda *a, **kw: (calls.append((a, kw)), real(*a, **kw))[1])
    (tmp_path / "p.txt").write_text("a photo of S*\n")
    assert evaluate.cli(["--images", str(imgs), "--prompts", str(tmp_path / "p.txt"), "--preset", "tiny",
                         "--encoder", "random", "--variants", "no_tuning", "--num-images", "1", "--steps", "1",
                         "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert len(calls) == 1 and calls[0][0][0] == "tiny"


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_follows_the_frozen_weights_dtype(monkeypatch):
    assert not model.autocast("cpu")._enabled
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert model.frozen_dtype("cuda") == torch.float16 and model.autocast("cuda").fast_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model.frozen_dtype("cuda") == torch.bfloat16 and model.autocast("cuda").fast_dtype == torch.bfloat16


def _fake_sd15_checkpoint(path, base=model.SD15_BASE, clip=model.SD15_CLIP[1]):
    torch.save({"format": model.ENCODER_FORMAT, "preset": "sd15", "base": base, "clip": clip, "step": 1,
                "encoder": {}, "layer_names": [], "layer_shapes": [],
                "encoder_dims": {"clip_channels": 1280, "unet_channels": 1280}}, path)
    return str(path)


@pytest.mark.parametrize("flag", ["--base", "--clip"])
def test_an_encoder_refuses_other_weights_than_it_was_trained_with(tmp_path, flag, capsys):
    ckpt = _fake_sd15_checkpoint(tmp_path / "enc.pt")
    args = ["--image", IMAGE, "--encoder", ckpt, flag, "other/weights", "--out", str(tmp_path / "c.pt")]
    assert tune.cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tune.py: error:") and f"trained with {flag}" in err and "other/weights" in err
    assert not (tmp_path / "c.pt").exists()
    imgs = tmp_path / "set"
    imgs.mkdir()
    data.synthetic_image(0, size=64).save(imgs / "dog.png")
    assert evaluate.cli(["--images", str(imgs), "--encoder", ckpt, flag, "other/weights", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("evaluate.py: error:")
    assert not (tmp_path / "e").exists()


def test_a_concept_refuses_another_base_than_it_was_tuned_on(tmp_path, tiny, capsys):
    comps, names = tiny
    concept = model.make_concept(comps, comps.token_table[:1].clone(), {}, "S*", 1.0, {}, [])
    concept.update(preset="sd15", base="my/sd15")
    cmdline.atomic_save(concept, str(tmp_path / "c.pt"))
    assert sample.cli(["--concept", str(tmp_path / "c.pt"), "--prompt", "a photo of S*", "--base", "other/sd15",
                       "--out", str(tmp_path / "s")]) == 2
    assert "trained with --base my/sd15" in capsys.readouterr().err and not (tmp_path / "s").exists()


# ---------------------------------------------------------------- Sec. 5.2: embedding regularisers


def test_nearest_cosine_loss_is_one_minus_cosine_to_the_nearest_token():
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    v = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    loss = losses.nearest_cosine_loss(v, table, exclude_ids=())
    expected = ((1 - 2 / 5 ** 0.5) + 0.0) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # The gradient turns the first v toward its nearest token (x axis): -grad has a negative y part.
    assert v.grad[0, 1] > 0 and torch.allclose(v.grad[1], torch.zeros(3), atol=1e-7)


@pytest.mark.parametrize("reg,expected", [("contrastive", {"contrastive", "embedding"}),
                                          ("nearest-cosine", {"nearest_cosine", "embedding"}),
                                          ("l2", {"embedding"}), ("none", set())])
def test_embedding_reg_chooses_the_terms_and_their_weights(tiny, reg, expected):
    comps, names = tiny
    cfg = pretrain.Config(preset="tiny", embedding_reg=reg, lambda_contrastive=0.3, lambda_nearest=0.2,
                          lambda_embedding=0.1, lambda_hyper=0.0)
    ds = data.ConceptImages("synthetic", None, comps.cfg.resolution, augment=False)
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    torch.manual_seed(0)
    enc = model.build_encoder(comps, names)
    terms = pretrain.pretrain_losses(cfg, comps, enc, batch, seed=5)
    assert set(terms) - {"diffusion", "hyper", "loss"} == expected
    weights = {"contrastive": 0.3, "nearest_cosine": 0.2, "embedding": 0.1}
    total = terms["diffusion"] + sum(weights[k] * terms[k] for k in expected)
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_regulariser_and_hypernet_are_recorded_and_shown_by_tune(tmp_path, capsys):
    cfg = pretrain.Config(preset="tiny", data="synthetic", out=str(tmp_path / "run"), steps=1, batch_size=2,
                          num_workers=0, warmup_steps=1, embedding_reg="nearest-cosine", hypernet=False)
    enc = pretrain.main(cfg)
    ckpt = model.load_encoder_checkpoint(str(tmp_path / "run" / "encoder.pt"))
    assert ckpt["config"]["embedding_reg"] == "nearest-cosine" and ckpt["hypernet"] is False
    assert not hasattr(enc, "a_heads") and model.count_parameters(enc) < 247_584
    capsys.readouterr()
    out = tmp_path / "c.pt"
    assert tune.cli(["--image", IMAGE, "--encoder", str(tmp_path / "run" / "encoder.pt"), "--steps", "0",
                     "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "embedding regulariser nearest-cosine" in err and "hypernetwork no" in err
    concept = model.load_concept(str(out))
    # No hypernetwork: the LoRA starts from zero (B = 0), and the concept says so.
    assert concept["tuning"]["hypernet"] is False and set(concept["lora_B"]) == set(ckpt["layer_names"])
    assert all(not b.any() for b in concept["lora_B"].values())


def test_no_hypernet_pretraining_runs_the_dual_path_without_lora(tiny, monkeypatch):
    comps, names = tiny
    seen = []
    real = model.dual_path_prediction
    monkeypatch.setattr(model, "dual_path_prediction", lambda *a, **kw: (seen.append(a[5]), real(*a, **kw))[1])
    cfg = pretrain.Config(preset="tiny", hypernet=False)
    ds = data.ConceptImages("synthetic", None, comps.cfg.resolution, augment=False)
    batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
    enc = model.build_encoder(comps, names, hypernet=False)
    terms = pretrain.pretrain_losses(cfg, comps, enc, batch, seed=0)
    assert seen == [{}] and "hyper" not in terms


# ---------------------------------------------------------------- Fig. 5a baselines, Fig. 5 / table


def test_textual_inversion_trains_v_alone_from_the_class_noun(tiny):
    comps, names = tiny
    img = data.load_image(IMAGE)
    noun_v = comps.token_table[list(model.tokenize_ids(comps.tokenizer, "dog"))].mean(0)
    ti, stats = tune.baseline_concept(comps, img, "textual_inversion", "dog", steps=3, lr=1e-2, batch_size=2,
                                      log=lambda s: None)
    assert ti["lora_A"] == {} and ti["alpha_blend"] == 1.0 and ti["tuning"]["method"] == "textual_inversion"
    assert len(stats["losses"]) == 3 and ti["tuning"]["seconds"] > 0
    moved = (ti["v_star"] - noun_v).norm().item()
    assert 0 < moved < 3 * 1e-2 * noun_v.numel() ** 0.5  # AdamW moves each entry by at most ~lr per step
    lora, _ = tune.baseline_concept(comps, img, "lora", "dog", steps=2, lr=1e-2, batch_size=2, log=lambda s: None)
    assert set(lora["lora_A"]) == set(names) and any(b.any() for b in lora["lora_B"].values())
    assert lora["tuning"]["lr_v"] == tune.BASELINES["lora"]["lr_v"]
    default, _ = tune.baseline_concept(comps, img, "textual_inversion", "dog", steps=1, lr=1e-2, log=lambda s: None)
    assert default["tuning"]["batch_size"] == tune.BASELINES["textual_inversion"]["batch_size"] == 4  # its reference's


def test_paper_variants_end_to_end_with_times_and_both_fig5_panels(tmp_path):
    imgs = tmp_path / "set"
    imgs.mkdir()
    data.synthetic_image(0, size=64).save(imgs / "dog_01.png")
    (tmp_path / "p.txt").write_text("a photo of S* on the beach\n")
    nohyper = pretrain.Config(preset="tiny", data="synthetic", out=str(tmp_path / "nh"), steps=1, batch_size=2,
                              num_workers=0, warmup_steps=1, hypernet=False)
    pretrain.main(nohyper)
    base = ["--images", str(imgs), "--prompts", str(tmp_path / "p.txt"), "--preset", "tiny", "--encoder", "random",
            "--variants", "paper", "--num-images", "1", "--steps", "1", "--tune-steps", "1", "--batch-size", "2",
            "--ti-steps", "2", "--lora-steps", "2", "--baseline-batch-size", "3", "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    assert evaluate.cli(base) == 2  # the no_hypernet variant needs its own encoder
    assert evaluate.cli(base + ["--no-hypernet-encoder", str(tmp_path / "nh" / "encoder.pt")]) == 0
    rep = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(rep["summary"]) == list(evaluate.VARIANTS)
    for v in evaluate.VARIANTS:
        assert rep["variants"][v]["dog_01"]["tune_s"] > 0 and rep["summary"][v]["tune_s"]["n"] == 1
    assert rep["variants"]["no_hypernet"]["dog_01"]["token"]  # tuned from the no-hypernet encoder
    c = model.load_concept(str(tmp_path / "o" / "concepts" / "no_hypernet" / "dog_01.pt"))
    assert c["tuning"]["encoder"] == str(tmp_path / "nh" / "encoder.pt") and c["tuning"]["hypernet"] is False
    for variant, batch in (("full", 2), ("textual_inversion", 3), ("lora", 3)):  # each flag reaches its own variants
        c = model.load_concept(str(tmp_path / "o" / "concepts" / variant / "dog_01.pt"))
        assert c["tuning"]["batch_size"] == batch
    md = (tmp_path / "o" / "metrics.md").read_text()
    assert "| tuning time (s) |" in md and "| textual_inversion |" in md
    with Image.open(tmp_path / "o" / "tradeoff.png") as im:
        assert im.size[0] > 1.8 * im.size[1]  # two panels side by side
    # The baselines are cached like the rest.
    assert evaluate.cli(base + ["--no-hypernet-encoder", str(tmp_path / "nh" / "encoder.pt")]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["reused"]["concepts"] == len(evaluate.VARIANTS)
