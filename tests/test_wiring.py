"""The wiring around the equations, asserted by value: what each step is fed and what it
passes on. A known input with a known output, or a spy on what was passed, tight enough that
one wrong constant, argument or tensor fails. (The equations themselves: test_core, test_losses.)"""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cmdline
import data
import evaluate
import model
import pretrain
import sample
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "concept.png")
# OpenAI CLIP's normalisation, written out here rather than read from the code under test.
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
SD_LATENT_SCALE = 0.18215  # SD 1.5's VAE scaling factor


def sd15_alphas_cumprod() -> torch.Tensor:
    """SD 1.5's schedule by hand: 'scaled_linear' betas from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def nearest_by_hand(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    sims = F.normalize(v.double(), dim=-1) @ F.normalize(table.double(), dim=-1).T
    sims[:, list(model.SPECIAL_IDS)] = -math.inf
    return sims.argmax(-1)


# ---------------------------------------------------------------------------------------
# What the backbones and the loss are fed


def test_vae_and_clip_views_are_scaled_exactly_as_sd_and_clip_expect():
    for value in (0, 255):  # a non-square picture of one colour
        im = Image.new("RGB", (48, 30), (value,) * 3)
        vae, clip = data.make_views(im, 32, clip_size=28, rng=random.Random(0))
        assert vae.shape == (3, 32, 32) and clip.shape == (3, 28, 28)
        assert torch.allclose(vae, torch.full_like(vae, value / 127.5 - 1)), "the VAE view is in [-1, 1]"
        want = torch.tensor((value / 255 - OPENAI_MEAN) / OPENAI_STD, dtype=torch.float32)[:, None, None]
        assert torch.allclose(clip, want.expand_as(clip), atol=1e-5), "the CLIP view has OpenAI's mean/std"


def test_augmentation_mirrors_about_half_the_views_and_keeps_most_of_the_picture():
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((255, 255, 255), (32, 0, 64, 64))  # left black, right white
    rng = random.Random(0)
    mirrored = 0
    for _ in range(200):
        vae, _ = data.make_views(im, 32, clip_size=32, rng=rng)
        left, right = vae[:, :, :4].mean().item(), vae[:, :, -4:].mean().item()
        assert abs(left - right) > 1.5  # the crop keeps both halves (80-100 % of the side)
        mirrored += left > right
    assert 70 <= mirrored <= 130, mirrored  # a fair coin: 100 +- 3.5 sigma


def test_vae_latents_are_a_posterior_sample_times_sd_scale(tiny):
    comps, _ = tiny
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    got = model.vae_latents(comps.vae, x, torch.Generator().manual_seed(3))
    with torch.no_grad():
        post = comps.vae.encode(x).latent_dist
    want = post.sample(generator=torch.Generator().manual_seed(3)) * SD_LATENT_SCALE
    assert torch.allclose(got, want, atol=1e-6)


def test_forward_diffusion_uses_sd15_schedule_over_all_timesteps_and_targets_the_noise(tiny):
    comps, _ = tiny
    a_bar = sd15_alphas_cumprod()
    assert abs(a_bar[999].item() - 0.0047) < 1e-4  # SD 1.5's last alpha-bar
    z0 = torch.randn(4000, 1, 1, 1)
    z_t, t, noise, target = model.noisy_latents(comps.noise_scheduler, z0, torch.Generator().manual_seed(0))
    a = a_bar[t].float()[:, None, None, None]
    assert torch.allclose(z_t, a.sqrt() * z0 + (1 - a).sqrt() * noise, atol=1e-5)
    assert torch.equal(target, noise)  # Eq. (1) regresses epsilon for SD 1.5
    assert t.min() < 10 and t.max() > 990 and abs(t.float().mean().item() - 499.5) < 15  # uniform on 0..999


def test_encoder_unet_branch_is_the_base_unets_own_mid_block_output(tiny):
    comps, _ = tiny
    z_t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    empty = model.empty_prompt_embeds(comps)
    for t_val in (0, 700):
        t = torch.tensor([t_val] * 2)
        seen = {}
        handle = comps.unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
        try:
            with torch.no_grad():  # the plain UNet on the empty prompt, at the same t
                comps.unet(z_t, t, encoder_hidden_states=empty.expand(2, -1, -1))
        finally:
            handle.remove()
        got = model.unet_encoder_features(comps.unet, z_t, t, empty)
        assert torch.allclose(got, seen["mid"], atol=1e-5), t_val


def test_empty_prompt_is_the_text_encoders_output_for_an_empty_caption(tiny):
    comps, _ = tiny
    ids = torch.full((1, 77), comps.tokenizer.pad_token_id)
    ids[0, :2] = torch.tensor([model.BOS_ID, model.EOS_ID])
    with torch.no_grad():
        want = comps.text_encoder(input_ids=ids).last_hidden_state
    assert torch.allclose(model.empty_prompt_embeds(comps), want, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The one encoder forward of tune.py, and the tuning loop (Sec. 4.4)


def test_tuning_feeds_the_encoder_the_centre_view_noised_to_the_encoder_timestep(tiny, monkeypatch):
    comps, names = tiny
    seen = {}
    real = model.encode

    def spy(encoder, comps_, clip_image, z_t, t):
        seen.update(clip=clip_image.clone(), z_t=z_t.clone(), t=t.clone())
        return real(encoder, comps_, clip_image, z_t, t)

    monkeypatch.setattr(model, "encode", spy)
    cfg = tune.Config(image=IMAGE, encoder="random", preset="tiny", steps=0, seed=4, encoder_timestep=321)
    enc = tune.build_tuning_encoder(None, comps, names, seed=0)
    img = data.load_image(IMAGE)
    tune.tune_concept(comps, enc, img, cfg, log=lambda s: None)

    assert img.size[0] == img.size[1]  # a square photo: the centre crop is the whole picture
    res, clip_size = comps.cfg.resolution, comps.cfg.clip_size
    pix = np.asarray(img.resize((clip_size, clip_size), Image.BICUBIC), dtype=np.float64) / 255
    want_clip = torch.tensor(((pix - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1), dtype=torch.float32)
    assert torch.allclose(seen["clip"][0], want_clip, atol=1e-5)
    assert seen["t"].tolist() == [321]
    vae_view = torch.tensor(np.asarray(img.resize((res, res), Image.BICUBIC), dtype=np.float64).transpose(2, 0, 1)
                            / 127.5 - 1, dtype=torch.float32).clamp(-1, 1)
    g = torch.Generator().manual_seed(4)  # tune's seed: the posterior sample, then the noise
    with torch.no_grad():
        z0 = comps.vae.encode(vae_view[None]).latent_dist.sample(generator=g) * SD_LATENT_SCALE
    noise = torch.randn(z0.shape, generator=g)
    a = sd15_alphas_cumprod()[321].item()
    assert torch.allclose(seen["z_t"], a ** 0.5 * z0 + (1 - a) ** 0.5 * noise, atol=1e-4)


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that remembers how it was built and, at each step, the parameters and their grads."""

    made = []

    def __init__(self, params, **kw):
        params = list(params)
        self.built = {"groups": [(len(g["params"]), g["lr"]) for g in params] if isinstance(params[0], dict) else None,
                      "kw": dict(kw)}
        super().__init__(params, **kw)
        self.steps = []
        RecordingAdamW.made.append(self)

    def step(self, closure=None):
        self.steps.append({"lr": [g["lr"] for g in self.param_groups],
                           "params": [p.detach().clone() for g in self.param_groups for p in g["params"]],
                           "grads": [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]})
        return super().step(closure)


@pytest.mark.parametrize("keep_hard_token", [True, False], ids=["hard-token-kept", "hard-token-follows-v"])
def test_each_tuning_step_follows_the_gradient_of_that_steps_loss_alone(tiny, monkeypatch, keep_hard_token):
    """Recompute every step's loss -- Eq. (1) through the dual path + anchor L2 to the encoder's
    prediction -- from what the step was fed, and compare its gradient with the one AdamW used.
    The hard token of C_h is the one given (tune.py: v0's nearest word), or else v's own at each step."""
    comps, names = tiny
    RecordingAdamW.made = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    fed, hard = [], []
    real_pred, real_noisy, real_soft_hard = model.dual_path_prediction, model.noisy_latents, model.encode_soft_and_hard

    def spy_noisy(*a, **k):
        out = real_noisy(*a, **k)
        fed.append({"target": out[3].clone()})
        return out

    def spy_pred(comps_, z_t, t, prompts, v, lora, alpha, placeholder=model.PLACEHOLDER, hard_ids=None):
        fed[-1].update(z_t=z_t.clone(), t=t.clone(), prompts=list(prompts), alpha=alpha, placeholder=placeholder,
                       hard_ids=hard_ids)
        return real_pred(comps_, z_t, t, prompts, v, lora, alpha, placeholder, hard_ids)

    def spy_soft_hard(text_encoder, tokenizer, prompts, v_star, token_table, placeholder=model.PLACEHOLDER,
                      hard_ids=None):
        out = real_soft_hard(text_encoder, tokenizer, prompts, v_star, token_table, placeholder, hard_ids)
        hard.append((v_star.detach().clone(), out[2].clone()))
        return out

    monkeypatch.setattr(model, "noisy_latents", spy_noisy)
    monkeypatch.setattr(model, "dual_path_prediction", spy_pred)
    monkeypatch.setattr(model, "encode_soft_and_hard", spy_soft_hard)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 4, 4, generator=g)
    v0 = comps.token_table[1000:1001].clone() + 0.01 * torch.randn(1, comps.token_table.shape[1], generator=g)
    lora0 = {n: (torch.randn(1, din, 2, generator=g) * 0.1, torch.randn(1, 2, dout, generator=g) * 0.1)
             for n, (din, dout) in zip(names, model.lora_shapes(comps.unet, names))}
    lr_v, lr_lora, lam, steps = 5e-2, 2e-2, 0.5, 3
    given = torch.tensor([1234]) if keep_hard_token else None  # (not v0's nearest word: it must come from here)
    v, lora, step_losses, _ = tune.optimise(comps, latents, v0, lora0, steps=steps, lr_v=lr_v, lr_lora=lr_lora,
                                            alpha=0.3, lambda_anchor=lam, seed=7, placeholder="S*", log=lambda s: None,
                                            hard_ids=given)

    (opt,) = RecordingAdamW.made
    assert opt.built["groups"] == [(1, lr_v), (2 * len(names), lr_lora)]  # v, then every A and B
    assert opt.built["kw"].get("weight_decay") == 0.0  # nothing pulls v, A, B toward zero
    assert len(opt.steps) == len(step_losses) == steps and len(fed) == steps
    assert len({tuple(f["t"].tolist()) for f in fed}) == steps  # fresh t (and noise) at each step
    anchors = [v0] + [p for AB in lora0.values() for p in AB]
    for k, (rec, f) in enumerate(zip(opt.steps, fed)):
        assert f["alpha"] == 0.3 and f["placeholder"] == "S*" and all("S*" in p for p in f["prompts"])
        assert f["hard_ids"] is given
        params = [p.clone().requires_grad_(True) for p in rec["params"]]
        lora_k = {n: (params[1 + 2 * i], params[2 + 2 * i]) for i, n in enumerate(lora0)}
        pred = real_pred(comps, f["z_t"], f["t"], f["prompts"], params[0], lora_k, 0.3, "S*", given)
        loss = F.mse_loss(pred.float(), f["target"]) + lam * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        assert abs(loss.item() - step_losses[k]) < 1e-5 * max(1.0, abs(loss.item()))
        grads = torch.autograd.grad(loss, params)
        for want, got in zip(grads, rec["grads"]):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), f"step {k + 1}"
        # The hard token of C_h: the one given, or the nearest real token of v *at this step* (Sec. 4.3).
        v_seen, ids = hard[k]
        want = [1234] if keep_hard_token else nearest_by_hand(v_seen, comps.token_table).tolist()
        assert torch.equal(v_seen, rec["params"][0]) and ids.tolist() == want
    assert not torch.equal(hard[0][0], hard[-1][0])  # v moved
    # The returned concept is the parameters after the last AdamW step.
    assert torch.equal(v, RecordingAdamW.made[0].param_groups[0]["params"][0].detach())


def test_tuning_views_are_distinct_augmentations_of_the_photo(tiny, monkeypatch):
    comps, _ = tiny
    img = data.load_image(IMAGE)
    views = []
    real = data.make_views
    monkeypatch.setattr(data, "make_views", lambda *a, **k: views.append(real(*a, **k)[0]) or views[-1:] + [None])
    lat = tune.view_latents(comps, img, 6, seed=1)
    assert lat.shape[:2] == (6, 4) and len(views) == 6
    for i in range(6):  # the pictures themselves differ (not only the VAE's posterior samples)
        for j in range(i):
            assert (views[i] - views[j]).abs().mean() > 1e-2, (i, j)
    assert torch.equal(lat, tune.view_latents(comps, img, 6, seed=1))  # seeded: the same views again
    assert all(torch.equal(a, b) for a, b in zip(views[:6], views[6:]))


def test_no_hypernet_flag_starts_the_lora_from_zero_and_keeps_v0(tiny):
    comps, names = tiny
    img = data.load_image(IMAGE)
    enc = tune.build_tuning_encoder(None, comps, names, seed=0)
    with torch.no_grad():  # give the random encoder's B head weights, so its Delta W is not 0
        for b in enc.b_heads:
            b.bias.normal_(0, 0.1)
    cfgs = [tune.Config(image=IMAGE, encoder="random", preset="tiny", steps=0, hypernet=h) for h in (True, False)]
    full, scratch = (tune.tune_concept(comps, enc, img, c, log=lambda s: None)[0] for c in cfgs)
    assert torch.equal(full["v_star"], scratch["v_star"])  # v0 comes from the encoder either way
    assert all(B.abs().sum() > 0 for B in full["lora_B"].values())
    assert all(torch.count_nonzero(B) == 0 for B in scratch["lora_B"].values())  # B = 0: Delta W = 0
    assert not scratch["tuning"]["hypernet"] and full["tuning"]["hypernet"]


def test_typical_token_norm_is_the_median_of_the_real_rows():
    table = torch.zeros(49408, 4)
    table[:, 0] = torch.linspace(0.1, 0.5, 49408)  # row norms 0.1 .. 0.5
    table[list(model.SPECIAL_IDS), 0] = 100.0  # start / end of text: never counted
    real = torch.ones(49408, dtype=torch.bool)
    real[list(model.SPECIAL_IDS)] = False
    assert model.typical_token_norm(table) == pytest.approx(table[real, 0].median().item(), rel=1e-6)


def test_tuning_defaults_are_the_papers():
    cfg = tune.Config()
    assert (cfg.steps, cfg.lr, cfg.alpha_blend) == (12, 2e-3, 0.25)  # Sec. 5.1


def test_textual_inversion_starts_from_the_class_nouns_token_embedding(tiny):
    comps, _ = tiny
    ids = comps.tokenizer("dog", add_special_tokens=False).input_ids
    assert torch.equal(tune.init_embedding(comps, "dog"), comps.token_table[ids].float().mean(0, keepdim=True))


def test_tune_cli_flags_reach_the_tuning_loop(tmp_path, monkeypatch):
    seen = {}
    real = tune.optimise

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(tune, "optimise", spy)
    tune.main(tune.parse_args(["--image", IMAGE, "--encoder", "random", "--preset", "tiny", "--steps", "2",
                               "--batch-size", "2", "--lr", "3e-3", "--alpha-blend", "0.4", "--lambda-anchor", "0.2",
                               "--seed", "5", "--placeholder", "<x>", "--out", str(tmp_path / "c.pt")]))
    assert {k: seen[k] for k in ("steps", "lr_v", "lr_lora", "alpha", "lambda_anchor", "seed", "placeholder")} == dict(
        steps=2, lr_v=3e-3, lr_lora=3e-3, alpha=0.4, lambda_anchor=0.2, seed=5, placeholder="<x>")
    concept = model.load_concept(str(tmp_path / "c.pt"))
    assert concept["alpha_blend"] == 0.4 and concept["placeholder"] == "<x>"


# ---------------------------------------------------------------------------------------
# Pre-training: the loss terms, their weights, the schedule, the optimiser, the shards


def test_pretraining_loss_is_the_weighted_sum_and_the_encoder_sees_the_noised_latent(tiny, monkeypatch):
    comps, names = tiny
    cfg = pretrain.Config(preset="tiny", data="synthetic", alpha_blend=0.35, lambda_contrastive=0.03,
                          lambda_embedding=0.002, lambda_hyper=0.0007, nn_k=3, tau=0.2)
    seen = {}
    real_encode, real_pred, real_nn = model.encode, model.dual_path_prediction, pretrain.losses.nn_contrastive_loss
    monkeypatch.setattr(model, "encode", lambda e, c, clip, z_t, t: seen.update(enc_z=z_t, enc_t=t) or real_encode(e, c, clip, z_t, t))
    monkeypatch.setattr(model, "dual_path_prediction", lambda c, z_t, t, p, v, lora, alpha, *a: seen.update(
        z_t=z_t, t=t, alpha=alpha) or real_pred(c, z_t, t, p, v, lora, alpha, *a))
    monkeypatch.setattr(pretrain.losses, "nn_contrastive_loss", lambda *a, **k: seen.update(nn=k) or real_nn(*a, **k))
    torch.manual_seed(0)
    enc = model.build_encoder(comps, names)
    with torch.no_grad():  # a non-zero Delta W, so that the hyper-weight term counts
        for b in enc.b_heads:
            b.bias.normal_(0, 0.1)
    ds = data.ConceptImages("synthetic", None, comps.cfg.resolution, comps.cfg.clip_size)
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    terms = pretrain.pretrain_losses(cfg, comps, enc, batch, seed=1)
    assert seen["enc_z"] is seen["z_t"] and torch.equal(seen["enc_t"], seen["t"])  # E(I_c, z_t, t), same z_t
    assert seen["alpha"] == 0.35 and seen["nn"]["k"] == 3 and seen["nn"]["tau"] == 0.2
    assert terms["hyper"].item() > 1e-3
    want = terms["diffusion"] + 0.03 * terms["contrastive"] + 0.002 * terms["embedding"] + 0.0007 * terms["hyper"]
    assert abs(terms["loss"].item() - want.item()) < 1e-6


def test_lr_schedule_is_linear_warmup_then_half_cosine_to_zero():
    f = pretrain.lr_lambda(pretrain.Config(steps=110, warmup_steps=10))
    assert [round(f(s), 6) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # the first step already learns
    assert f(10) == 1.0 and abs(f(35) - 0.5 * (1 + math.cos(math.pi / 4))) < 1e-12
    assert abs(f(60) - 0.5) < 1e-12 and f(110) == 0.0 and f(500) == 0.0


def test_pretraining_steps_with_the_scheduled_lr_clipped_grads_and_its_weight_decay(tmp_path, monkeypatch):
    RecordingAdamW.made = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k: clips.append(max_norm)
                        or real_clip(params, max_norm, *a, **k))
    cfg = pretrain.Config(preset="tiny", data="synthetic", out=str(tmp_path / "run"), steps=6, batch_size=2, lr=1e-3,
                          warmup_steps=2, num_workers=0, log_every=1, save_every=1000, grad_clip=0.7,
                          weight_decay=0.05)
    pretrain.main(cfg)
    (opt,) = RecordingAdamW.made
    assert opt.built["kw"] == {"lr": 1e-3, "weight_decay": 0.05}
    f = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4))]
    assert np.allclose([s["lr"][0] for s in opt.steps], [1e-3 * x for x in f])
    assert clips == [0.7] * 6
    with open(os.path.join(cfg.out, "log.jsonl")) as fh:
        logged = [r["lr"] for r in map(json.loads, fh) if "lr" in r]
    assert np.allclose(logged, [1e-3 * x for x in f[1:] + [0.0]])  # the lr of the next step


def test_ddp_shards_are_disjoint_and_cover_the_epoch():
    shards = [[i for i, _ in data.ResumableSampler(103, 4, r, seed=1, epoch=2)] for r in range(4)]
    flat = [i for s in shards for i in s]
    assert all(len(s) == 25 for s in shards) and len(set(flat)) == 100 and set(flat) <= set(range(103))
    again = [i for i, _ in data.ResumableSampler(103, 4, 1, seed=1, epoch=2, skip=10)]
    assert again == shards[1][10:]  # a resumed rank skips what it already saw


def test_validation_gap_is_exactly_zero_for_an_image_blind_encoder_and_not_otherwise(tiny, tmp_path):
    """Matched and swapped differ only in the concept (same views, noise, t, prompts)."""
    comps, names = tiny
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(3):
        data.synthetic_image(i, size=64).save(folder / f"c{i}.png")
    cfg = pretrain.Config(preset="tiny", data="synthetic", val_images=str(folder), val_views=2)
    val = pretrain.load_validation_set(cfg, comps)
    torch.manual_seed(0)
    enc = model.build_encoder(comps, names)
    with torch.no_grad():
        for b in enc.b_heads:  # a Delta W that depends on the image (through A)
            b.bias.normal_(0, 0.1)
    rec = pretrain.validate(cfg, comps, enc, val, step=1, out_dir=str(tmp_path / "o"))
    assert rec["n"] == 3 and abs(rec["gap"]) > 1e-7 and rec["gap_se"] > 0
    assert rec["delta_w_norm"] > 0 and rec["v_norm"] > 0
    # |v*| is shown beside a word's: the median norm of the table's words (Eq. 4's scale)
    assert rec["word_norm"] == pytest.approx(model.typical_token_norm(comps.token_table))
    with torch.no_grad():  # blind the encoder: every image now gets the same concept
        enc.clip_proj.weight.zero_()
        enc.unet_proj.weight.zero_()
    rec = pretrain.validate(cfg, comps, enc, val, step=2, out_dir=str(tmp_path / "o"))
    assert rec["gap"] == 0 and rec["gap_se"] == 0 and rec["matched"] == rec["swapped"]
    # ... and its v* have collapsed: one v* for all three images, one nearest word.
    assert rec["v_pairwise_cos"] == pytest.approx(1, abs=1e-5) and list(rec["top_words"].values()) == [3]
    assert sorted(rec["words"]) == ["c0.png", "c1.png", "c2.png"] and len({tuple(w) for w in rec["words"].values()}) == 1
    assert sorted(os.listdir(tmp_path / "o" / "val")) == ["step_0000001.png", "step_0000002.png"]


def cat_dog_dog_validation_set(comps, tmp_path) -> dict:
    """pretrain's validation set of three synthetic pictures named cat_1, dog_1, dog_2 (2 views each)."""
    folder = tmp_path / "val"
    folder.mkdir()
    for i, f in enumerate(["cat_1.png", "dog_1.png", "dog_2.png"]):
        data.synthetic_image(i, size=64).save(folder / f)
    cfg = pretrain.Config(preset="tiny", data="synthetic", val_images=str(folder), val_views=2)
    return pretrain.load_validation_set(cfg, comps)


def test_validation_gap_splits_by_class_noun_and_a_class_only_encoder_has_no_same_class_gap(tiny, tmp_path):
    """Swapped with the next image of another class, and with the next of the same class: two
    dogs that get one shared concept (a class, not an instance) have a same-class gap of exactly 0."""
    comps, names = tiny
    val = cat_dog_dog_validation_set(comps, tmp_path)
    assert [val["nouns"][f] for f in val["files"]] == ["cat", "dog", "dog"]
    g = torch.Generator().manual_seed(0)

    def concept():
        v = comps.token_table[2000:2001] + 0.1 * torch.randn(1, comps.token_table.shape[1], generator=g)
        return v, {n: (torch.randn(1, din, 2, generator=g), 0.1 * torch.randn(1, 2, dout, generator=g))
                   for n, (din, dout) in zip(names, model.lora_shapes(comps.unet, names))}

    cat, dog = concept(), concept()
    concepts, alphas = [cat, dog, dog], [0.3] * 3
    cache = {}
    matched = pretrain.concept_losses(comps, concepts, alphas, val, [0, 1, 2], cache)
    rec = pretrain.class_split_gaps(comps, concepts, alphas, val, cache)
    assert rec["n_same_class"] == 2 and rec["gap_same_class"] == 0 and rec["gap_same_class_se"] == 0
    other = pretrain.concept_losses(comps, concepts, alphas, val, [1, 0, 0])  # cat -> dog_1, each dog -> cat
    assert rec["n_other_class"] == 3 and abs(rec["gap_other_class"]) > 1e-7
    assert rec["gap_other_class"] == pytest.approx(sum(o - m for o, m in zip(other, matched)) / 3)
    # The logged gap swaps with the next file, whatever its class: here cat -> dog_1 -> dog_2 -> cat.
    _, swapped, gap = pretrain.matched_vs_swapped(comps, concepts, alphas, val)
    assert swapped[1] == matched[1] and gap["mean"] == pytest.approx((swapped[0] - matched[0] + swapped[2] - matched[2]) / 3)
    val["nouns"] = dict.fromkeys(val["files"], "object")  # one noun: nothing to split
    assert pretrain.class_split_gaps(comps, concepts, alphas, val, cache) == {}
    assert pretrain.class_partners(["a", "a", "b", "b", "c"]) == {"other_class": [2, 2, 4, 4, 0],
                                                                   "same_class": [1, 0, 3, 2, None]}


def test_same_class_gap_is_split_into_the_twins_word_and_the_twins_weights(tiny, tmp_path):
    """Two dogs with one v* and different Delta W: swapping in the twin's v* alone costs exactly
    nothing, its Delta W alone costs the whole same-class gap; and the other way round."""
    comps, names = tiny
    val = cat_dog_dog_validation_set(comps, tmp_path)
    g = torch.Generator().manual_seed(1)
    shapes = model.lora_shapes(comps.unet, names)
    word = lambda: comps.token_table[2000:2001] + 0.3 * torch.randn(1, comps.token_table.shape[1], generator=g)
    weights = lambda: {n: (torch.randn(1, din, 2, generator=g), 0.3 * torch.randn(1, 2, dout, generator=g))
                       for n, (din, dout) in zip(names, shapes)}
    cat, v, w = (word(), weights()), word(), weights()
    cases = [([(v, w), (v, weights())], "v"),  # one word, two weight sets: the word says nothing
             ([(v, w), (word(), w)], "dw")]  # one weight set, two words: the weights say nothing
    for dogs, zero_part in cases:
        concepts, alphas = [cat, *dogs], [0.3] * 3
        rec = pretrain.class_split_gaps(comps, concepts, alphas, val, {})
        other = "dw" if zero_part == "v" else "v"
        assert rec[f"gap_same_class_{zero_part}_only"] == 0 and rec[f"gap_same_class_{zero_part}_only_se"] == 0
        assert abs(rec["gap_same_class"]) > 1e-7
        assert rec[f"gap_same_class_{other}_only"] == pytest.approx(rec["gap_same_class"], rel=1e-5, abs=1e-9)
    # No Delta W at all (a --no-hypernet encoder): nothing to split.
    rec = pretrain.class_split_gaps(comps, [(cat[0], {}), (v, {}), (word(), {})], [0.3] * 3, val, {})
    assert "gap_same_class" in rec and "gap_same_class_v_only" not in rec


def test_val_concepts_measures_saved_concept_files_with_the_same_signal(tiny, tmp_path, capsys):
    comps, names = tiny
    images, same, own = tmp_path / "val", tmp_path / "same", tmp_path / "own"
    for d in (images, same, own):
        d.mkdir()
    for i in range(3):
        data.synthetic_image(i, size=64).save(images / f"c{i}.png")
        cfg = tune.Config(image=str(images / f"c{i}.png"), encoder="random", preset="tiny", steps=1, batch_size=2)
        enc = tune.build_tuning_encoder(None, comps, names, seed=0)
        concept = tune.tune_concept(comps, enc, data.load_image(cfg.image), cfg, log=lambda s: None)[0]
        cmdline.atomic_save(concept, str(own / f"c{i}.pt"))
        if i == 0:
            for j in range(3):
                cmdline.atomic_save(concept, str(same / f"c{j}.pt"))
    base = ["--preset", "tiny", "--val-images", str(images), "--val-views", "2"]
    assert pretrain.cli(base + ["--val-concepts", str(same)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["n"] == 3 and rec["gap"] == 0 and rec["matched"] == rec["swapped"]  # one concept for all: no gap
    assert pretrain.cli(base + ["--val-concepts", str(own)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["n"] == 3 and abs(rec["gap"]) > 1e-7 and rec["gap_se"] > 0
    assert pretrain.cli(base + ["--val-concepts", str(tmp_path / "nope")]) == 2


# ---------------------------------------------------------------------------------------
# Sampling: what sample.py's flags and a concept file become in the pipeline call


class FakePipe:
    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append(kw)
        n = len(kw["generator"])
        return type("Out", (), {"images": [Image.new("RGB", (8, 8))] * n})()


def _concept(comps, names, alpha=0.3, scale_b=0.1):
    g = torch.Generator().manual_seed(0)
    v = comps.token_table[2000:2001].clone() + 0.01 * torch.randn(1, comps.token_table.shape[1], generator=g)
    lora = {n: (torch.randn(1, din, 2, generator=g), torch.randn(1, 2, dout, generator=g) * scale_b)
            for n, (din, dout) in zip(names, model.lora_shapes(comps.unet, names))}
    return model.make_concept(comps, v, lora, "S*", alpha, {"method": "date"}, [1.0])


def test_generate_passes_soft_prompt_hard_prompt_per_cfg_half_lora_alpha_and_seeds(tiny):
    comps, names = tiny
    concept = _concept(comps, names)
    concept["lora_scale"] = 0.7
    pipe = FakePipe()
    sample.generate(pipe, comps, concept, "a photo of S* at night", negative_prompt="blurry", num_images=3, steps=9,
                    guidance=4.0, seed=11, alpha_blend=0.6)
    (kw,) = pipe.calls
    assert kw["num_inference_steps"] == 9 and kw["guidance_scale"] == 4.0
    assert [g.initial_seed() for g in kw["generator"]] == [11, 12, 13]
    te, tok = comps.text_encoder, comps.tokenizer
    prompts = ["a photo of S* at night"] * 3
    C = model.encode_prompt(te, tok, prompts, v_star=concept["v_star"][None])
    C_h = model.encode_prompt(te, tok, prompts, hard_ids=torch.tensor([concept["token_id"]]))
    neg = model.encode_prompt(te, tok, ["blurry"] * 3)
    assert concept["token_id"] == nearest_by_hand(concept["v_star"][None], comps.token_table).item()
    assert torch.allclose(kw["prompt_embeds"], C, atol=1e-5) and torch.allclose(kw["negative_prompt_embeds"], neg, atol=1e-5)
    ca = kw["cross_attention_kwargs"]
    # The pipeline's guidance batch is [unconditional; conditional]: C_h rides with the conditional half.
    assert torch.allclose(ca["hard_encoder_hidden_states"], torch.cat([neg, C_h]), atol=1e-5)
    assert ca["alpha"] == 0.6 and ca["lora_scale"] == 0.7
    for n in names:
        A, B = ca["lora"][n]
        assert torch.equal(A[0], concept["lora_A"][n]) and torch.equal(B[0], concept["lora_B"][n])
    sample.generate(pipe, comps, concept, "a photo of S*", num_images=1, steps=2)
    assert pipe.calls[-1]["cross_attention_kwargs"]["alpha"] == concept["alpha_blend"] == 0.3  # the file's alpha


def test_sample_cli_flags_reach_generate(tmp_path, tiny, monkeypatch):
    comps, names = tiny
    path = str(tmp_path / "c.pt")
    cmdline.atomic_save(_concept(comps, names), path)
    seen = []
    monkeypatch.setattr(sample, "generate", lambda pipe, comps_, concept, prompt, **kw: seen.append((concept, prompt, kw))
                        or [Image.new("RGB", (8, 8))] * kw["num_images"])
    sample.main(sample.parse_args(["--concept", path, "--prompt", "S* in snow", "--negative-prompt", "dark", "--steps",
                                   "7", "--guidance", "3.5", "--alpha-blend", "0.8", "--seed", "4", "--num-images", "3",
                                   "--batch-size", "2", "--out", str(tmp_path / "out")]))
    assert [(p, kw["seed"], kw["num_images"]) for _, p, kw in seen] == [("S* in snow", 4, 2), ("S* in snow", 6, 1)]
    for concept, _, kw in seen:
        assert concept["token_id"] == model.load_concept(path)["token_id"]
        assert {k: kw[k] for k in ("negative_prompt", "steps", "guidance", "alpha_blend")} == dict(
            negative_prompt="dark", steps=7, guidance=3.5, alpha_blend=0.8)


def test_sampler_is_sd15s_ddim_timesteps():
    sched = model.sampling_scheduler(model.load_components("tiny", device="meta").noise_scheduler)
    sched.set_timesteps(50)
    ts = sched.timesteps.tolist()
    assert ts[:3] == [981, 961, 941] and ts[-1] == 1 and len(ts) == 50  # "leading" spacing, steps_offset 1
    assert sched.config.clip_sample is False and sched.config.set_alpha_to_one is False
    assert sched.config.prediction_type == "epsilon"


# ---------------------------------------------------------------------------------------
# Concept files and evaluation bookkeeping


def test_concept_file_keeps_the_alpha_and_scale_it_was_tuned_with(tmp_path, tiny):
    comps, names = tiny
    path = str(tmp_path / "c.pt")
    cmdline.atomic_save(_concept(comps, names, alpha=0.4), path)
    c = model.load_concept(path)
    assert c["alpha_blend"] == 0.4 and c["lora_scale"] == comps.cfg.lora_scale and c["rank"] == comps.cfg.lora_rank


def test_standard_error_and_variant_settings():
    r = cmdline.mean_se([1.0, 2.0, 3.0, 4.0])
    assert r["mean"] == 2.5 and r["n"] == 4 and abs(r["se"] - math.sqrt((5 / 3) / 4)) < 1e-12
    cfg = evaluate.Config(images="x", encoder="e.pt", no_hypernet_encoder="nh.pt", tune_steps=12, seed=3,
                          lambda_anchor=0.3)
    want = {"full": (12, 0.25, "e.pt", True), "no_tuning": (0, 0.25, "e.pt", True),
            "no_dual_path": (12, 1.0, "e.pt", True), "no_hypernet": (12, 0.25, "nh.pt", True),
            "lora_from_zero": (12, 0.25, "e.pt", False)}
    for variant, fields in want.items():
        tc = evaluate.variant_config(cfg, variant, "img.png")
        assert (tc.steps, tc.alpha_blend, tc.encoder, tc.hypernet) == fields, variant
        assert tc.seed == 3 and tc.image == "img.png" and tc.lr == 2e-3 and tc.lambda_anchor == 0.3
        assert evaluate.variant_settings(cfg, variant)["lambda_anchor"] == 0.3  # a cached concept must match it


def test_clip_t_text_is_the_prompt_with_the_class_noun():
    assert evaluate.noun_prompt("a photo of S* on a beach", "dog") == "a photo of dog on a beach"


def test_a_failed_atomic_write_leaves_neither_a_temp_file_nor_a_changed_target(tmp_path):
    target = tmp_path / "concept.pt"
    target.write_bytes(b"old")

    def fails_halfway(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        cmdline.atomic_write(str(target), fails_halfway)
    assert os.listdir(tmp_path) == ["concept.pt"] and target.read_bytes() == b"old"
    cmdline.atomic_write(str(target), lambda tmp: open(tmp, "wb").write(b"new"))
    assert os.listdir(tmp_path) == ["concept.pt"] and target.read_bytes() == b"new"
