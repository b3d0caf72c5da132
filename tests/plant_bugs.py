"""
tests/plant_bugs.py -- does the test suite catch plausible bugs? (mutation testing by hand)

Not part of the suite (pytest only collects test_*.py). For each planted bug below: copy the
tracked files to a temporary folder, make that one edit, run the whole suite there (stopping
at the first failure) and record which test caught it. A bug that no test catches "survives".

    python tests/plant_bugs.py                 # every bug; a table on stdout, JSON in runs/plant_bugs.json
    python tests/plant_bugs.py --only tune-    # the bugs whose id starts with "tune-"
    python tests/plant_bugs.py --list          # the bugs, without running anything

Each bug is one small edit a careful person could make: a wrong constant, a dropped argument,
a swapped tensor, a flag that no longer reaches the function it configures. Each edit must
match the source exactly once, so the list breaks loudly when the code it names changes.
About 1-3 minutes per surviving bug on 2 CPU cores (the whole suite runs); caught bugs stop early.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, file, old text, new text, what the bug is)
BUGS = [
    # --- the <= 12-step tuning loop (Sec. 4.4) -------------------------------------------
    ("tune-anchor-to-self", "tune.py",
     "params, anchors = [v] + lora_params, [v0] + [p for AB in lora0.values() for p in AB]",
     "params, anchors = [v] + lora_params, [v.detach()] + [p.detach() for p in lora_params]",
     "the anchor L2 anchors to the current values (always 0) instead of the encoder's prediction"),
    ("tune-anchor-v-only", "tune.py",
     "loss = diff + lambda_anchor * losses.anchor_l2(params, anchors) if lambda_anchor else diff",
     "loss = diff + lambda_anchor * losses.anchor_l2(params[:1], anchors[:1]) if lambda_anchor else diff",
     "the anchor keeps v near v0 but not A, B"),
    ("tune-v-not-optimised", "tune.py",
     'groups = [{"params": [v], "lr": lr_v}] + ([{"params": lora_params, "lr": lr_lora}] if lora_params else [])',
     'groups = [{"params": [v], "lr": 0.0}] + ([{"params": lora_params, "lr": lr_lora}] if lora_params else [])',
     "the optimiser never moves v"),
    ("tune-lora-lr-is-v-lr", "tune.py",
     '([{"params": lora_params, "lr": lr_lora}] if lora_params else [])',
     '([{"params": lora_params, "lr": lr_v}] if lora_params else [])',
     "the LoRA gets v's learning rate (the LoRA baseline's 1e-4 becomes 5e-4)"),
    ("tune-weight-decay", "tune.py", "opt = torch.optim.AdamW(groups, weight_decay=0.0)",
     "opt = torch.optim.AdamW(groups)", "AdamW's default weight decay 0.01 pulls v, A, B toward 0"),
    ("tune-no-zero-grad", "tune.py", "            opt.zero_grad(set_to_none=True)\n            loss.backward()",
     "            loss.backward()", "gradients accumulate across steps"),
    ("tune-one-step-short", "tune.py", "        for step in range(steps):", "        for step in range(max(0, steps - 1)):",
     "one step fewer than asked"),
    ("tune-same-noise-every-step", "tune.py", "manual_seed(seed * 1_000_003 + step)", "manual_seed(seed * 1_000_003)",
     "the same noise and t at every step"),
    ("tune-hard-token-frozen", "model.py",
     "hard_ids = nearest_tokens(v_star, token_table, k=1)[0][:, 0]  # (N|1,) ids of v_h",
     "hard_ids = nearest_tokens(v_star, token_table, k=2)[0][:, 1]  # (N|1,) ids of v_h",
     "the hard token is v's second-nearest token"),
    ("tune-encoder-sees-clean-latent", "tune.py",
     "v0, lora0 = model.encode(encoder, comps, clip_view[None].to(device), z_t, t_enc)",
     "v0, lora0 = model.encode(encoder, comps, clip_view[None].to(device), z0, t_enc)",
     "tuning feeds the encoder's UNet branch the clean latent instead of z_t at t = 500"),
    ("tune-encoder-timestep-ignored", "tune.py", "t_enc = torch.tensor([cfg.encoder_timestep], device=device)",
     "t_enc = torch.tensor([500], device=device)", "--encoder-timestep never reaches the encoder"),
    ("tune-hypernet-flag-ignored", "tune.py", "    if not (cfg.hypernet and trained_hypernet):",
     "    if not trained_hypernet:", "--no-hypernet no longer starts the LoRA from zero"),
    ("tune-alpha-default", "tune.py", "    alpha_blend: float = 0.25  # Eq. (5), Sec. 5.1",
     "    alpha_blend: float = 0.5  # Eq. (5), Sec. 5.1", "the paper's alpha 0.25 (Sec. 5.1) changed"),
    ("tune-lr-default", "tune.py", "    lr: float = 2e-3  # Sec. 5.1", "    lr: float = 1e-3  # Sec. 5.1",
     "the paper's tuning lr 2e-3 changed"),
    ("tune-alpha-flag-ignored", "tune.py", "alpha=cfg.alpha_blend, lambda_anchor=cfg.lambda_anchor, seed=cfg.seed",
     "alpha=0.25, lambda_anchor=cfg.lambda_anchor, seed=cfg.seed", "--alpha-blend never reaches the tuning loop"),
    ("tune-anchor-flag-ignored", "tune.py", "alpha=cfg.alpha_blend, lambda_anchor=cfg.lambda_anchor, seed=cfg.seed",
     "alpha=cfg.alpha_blend, lambda_anchor=0.01, seed=cfg.seed", "--lambda-anchor never reaches the tuning loop"),
    ("tune-views-not-augmented", "tune.py",
     "rng if augment else None)[0] for _ in range(n)]", "None)[0] for _ in range(n)]",
     "the tuning views are all the same centre crop"),
    ("tune-ti-starts-random", "tune.py", "    return comps.token_table.detach().float()[ids].mean(0, keepdim=True)",
     "    return torch.randn_like(comps.token_table[:1]).float() * 0.3",
     "textual inversion does not start from the class noun"),

    # --- the learning-rate schedule of pre-training ----------------------------------------
    ("lr-warmup-starts-at-zero", "pretrain.py", "return (step + 1) / cfg.warmup_steps", "return step / cfg.warmup_steps",
     "warm-up's first step has lr 0"),
    ("lr-half-cosine", "pretrain.py", "return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))",
     "return math.cos(0.5 * math.pi * min(1.0, progress))", "a quarter cosine instead of the half cosine"),
    ("lr-cosine-over-all-steps", "pretrain.py", "progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)",
     "progress = (step - cfg.warmup_steps) / max(1, cfg.steps)", "the cosine does not reach 0 at the last step"),
    ("lr-no-sched-step", "pretrain.py", "                opt.step()\n                sched.step()",
     "                opt.step()", "the schedule never advances"),

    # --- pre-training wiring ------------------------------------------------------------------
    ("pre-hyper-weight", "pretrain.py", "total = total + cfg.lambda_hyper * terms[\"hyper\"]",
     "total = total + cfg.lambda_embedding * terms[\"hyper\"]", "the hyper-weight term gets lambda_e"),
    ("pre-tau-flag-ignored", "pretrain.py", "k=cfg.nn_k, tau=cfg.tau,", "k=cfg.nn_k, tau=0.07,",
     "--tau never reaches Eq. (3)"),
    ("pre-k-flag-ignored", "pretrain.py", "k=cfg.nn_k, tau=cfg.tau,", "k=5, tau=cfg.tau,",
     "--nn-k never reaches Eq. (3)"),
    ("pre-alpha-one", "pretrain.py",
     "pred = model.dual_path_prediction(comps, z_t, t, prompts, v, lora, cfg.alpha_blend)  # Eq. (5)",
     "pred = model.dual_path_prediction(comps, z_t, t, prompts, v, lora, 1.0)  # Eq. (5)",
     "pre-training ignores --alpha-blend (single path)"),
    ("pre-encoder-sees-clean-latent", "pretrain.py",
     "v, lora = model.encode(encoder, comps, clip_images, z_enc, t_enc)  # (N, D), {name: (A, B)}",
     "v, lora = model.encode(encoder, comps, clip_images, z0, t_enc)  # (N, D), {name: (A, B)}",
     "pre-training feeds the encoder's UNet branch the clean latent"),
    ("pre-no-grad-clip", "pretrain.py", "                torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.grad_clip)\n",
     "", "no gradient clipping"),
    ("pre-no-zero-grad", "pretrain.py", "                opt.zero_grad(set_to_none=True)\n                terms[\"loss\"].backward()",
     "                terms[\"loss\"].backward()", "gradients accumulate across steps"),
    ("pre-weight-decay-ignored", "pretrain.py", "lr=cfg.lr, weight_decay=cfg.weight_decay)", "lr=cfg.lr)",
     "--weight-decay never reaches AdamW"),

    # --- Eq. (3) under DDP ----------------------------------------------------------------------
    ("ddp-own-rank-in-negatives", "pretrain.py", "return torch.cat([p for i, p in enumerate(parts) if i != rank])",
     "return torch.cat([p for i, p in enumerate(parts)])", "this rank's own v* counted again as negatives"),
    ("ddp-gather-no-reduce", "pretrain.py", "        dist.all_reduce(grad)  # + what the other ranks' losses sent\n",
     "", "the other ranks' gradients never come back (a detached gather, in effect)"),
    ("ddp-gather-wrong-slice", "pretrain.py", "        return grad[dist.get_rank()]", "        return grad[0]",
     "every rank takes rank 0's gradient slice"),
    ("ddp-same-shard", "data.py", None, None, "every rank reads the same shard"),
    ("eq3-no-self-mask", "losses.py", "    neg = neg.masked_fill(self_mask, -float(\"inf\"))\n", "",
     "each v* is its own negative"),

    # --- what the encoder's backbones are fed -------------------------------------------------
    ("feed-clip-std-is-mean", "data.py", "/ torch.tensor(CLIP_STD)[:, None, None]", "/ torch.tensor(CLIP_MEAN)[:, None, None]",
     "CLIP normalisation divides by the mean"),
    ("feed-clip-not-normalised", "data.py",
     "    return (clip - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]",
     "    return clip", "the CLIP view is not normalised"),
    ("feed-vae-unscaled", "model.py", "    return dist.sample(generator=generator) * vae.config.scaling_factor",
     "    return dist.sample(generator=generator)", "latents without SD's 0.18215 scale"),
    ("feed-vae-range-01", "data.py", "vae = _to_tensor(im.resize((resolution, resolution), Image.BICUBIC)) * 2 - 1",
     "vae = _to_tensor(im.resize((resolution, resolution), Image.BICUBIC))", "the VAE view in [0, 1], not [-1, 1]"),
    ("feed-target-is-z0", "model.py",
     'target = scheduler.get_velocity(z0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise',
     'target = scheduler.get_velocity(z0, noise, t) if scheduler.config.prediction_type == "v_prediction" else z0',
     "Eq. (1) regresses the clean latent instead of the noise"),
    ("feed-t-half-range", "model.py",
     "t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],)",
     "t = torch.randint(0, scheduler.config.num_train_timesteps // 2, (z0.shape[0],)",
     "training t only covers half the schedule"),
    ("feed-unet-branch-no-timestep", "model.py", "emb = unet.time_embedding(unet.time_proj(t).to(dtype))  # (N, time_dim)",
     "emb = unet.time_embedding(unet.time_proj(t * 0).to(dtype))  # (N, time_dim)",
     "the encoder's UNet branch is told t = 0"),
    ("feed-unet-branch-zero-context", "model.py", "ctx = empty_emb.to(dtype).expand(z_t.shape[0], -1, -1)  # (N, 77, D)",
     "ctx = torch.zeros_like(empty_emb).to(dtype).expand(z_t.shape[0], -1, -1)  # (N, 77, D)",
     "the encoder's UNet branch gets zeros instead of the empty prompt's encoding"),
    ("feed-clip-pooled-only", "model.py", "_, tokens = image_encoder(clip_image.to(next(image_encoder.parameters()).dtype))",
     "tokens, _ = image_encoder(clip_image.to(next(image_encoder.parameters()).dtype)); tokens = tokens[:, None].expand(-1, 4, -1)",
     "the CLIP branch uses the pooled embedding, not the last layer's patch tokens"),
    ("feed-flip-always", "data.py", "if rng is not None and rng.random() < 0.5:", "if rng is not None:",
     "every augmented view is mirrored"),
    ("feed-b-head-not-zero", "model.py", "            nn.init.zeros_(b.weight)\n", "",
     "B's prediction layer not initialised to zero (Delta W != 0 at init)"),
    ("feed-token-norm-bias", "model.py", "        last.bias.mul_(target / norm)\n", "",
     "v*'s starting norm scales the weight but not the bias"),

    # --- sampling ---------------------------------------------------------------------------
    ("sample-guidance-ignored", "sample.py",
     "args = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,\n                alpha_blend=cfg.alpha_blend)",
     "args = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=7.5,\n                alpha_blend=cfg.alpha_blend)",
     "--guidance never reaches the pipeline"),
    ("sample-negative-ignored", "sample.py",
     "args = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,\n                alpha_blend=cfg.alpha_blend)",
     "args = dict(negative_prompt=\"\", steps=cfg.steps, guidance=cfg.guidance,\n                alpha_blend=cfg.alpha_blend)",
     "--negative-prompt never reaches the pipeline"),
    ("sample-steps-ignored", "sample.py",
     "args = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,\n                alpha_blend=cfg.alpha_blend)",
     "args = dict(negative_prompt=cfg.negative_prompt, steps=50, guidance=cfg.guidance,\n                alpha_blend=cfg.alpha_blend)",
     "--steps never reaches the pipeline"),
    ("sample-alpha-ignored", "sample.py",
     "args = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,\n                alpha_blend=cfg.alpha_blend)",
     "args = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,\n                alpha_blend=None)",
     "--alpha-blend never reaches the dual path"),
    ("sample-cfg-order", "sample.py", "hard = torch.cat([neg, C_h]) if guidance > 1 else C_h",
     "hard = torch.cat([C_h, neg]) if guidance > 1 else C_h", "C_h paired with the wrong half of the CFG batch"),
    ("sample-hard-uncond-is-cond", "sample.py", "hard = torch.cat([neg, C_h]) if guidance > 1 else C_h",
     "hard = torch.cat([C_h, C_h]) if guidance > 1 else C_h", "the unconditional half's hard path sees the prompt"),
    ("sample-one-seed", "sample.py", "gens = [torch.Generator(device).manual_seed(seed + i) for i in range(num_images)]",
     "gens = [torch.Generator(device).manual_seed(seed) for i in range(num_images)]", "every image gets the same seed"),
    ("sample-lora-scale", "sample.py", "lora_scale=concept[\"lora_scale\"])\n    return pipe(",
     "lora_scale=1.0)\n    return pipe(", "the concept's lora_scale is not used"),
    ("sample-clip-sample", "model.py", "SD15_SAMPLER_SETTINGS = dict(clip_sample=False,", "SD15_SAMPLER_SETTINGS = dict(",
     "the sampler's clip_sample comes from the file"),
    ("sample-eta", "model.py", "return DDIMScheduler.from_config(noise_scheduler.config, **SD15_SAMPLER_SETTINGS)",
     "return DDIMScheduler.from_config(noise_scheduler.config, **{**SD15_SAMPLER_SETTINGS, 'timestep_spacing': 'linspace'})",
     "DDIM spaces its timesteps differently from SD 1.5 (leading)"),

    # --- the dual path and LoRA (Eq. 2, Eq. 5) ----------------------------------------------
    ("eq5-alpha-swapped", "dualpath.py", "out = alpha * out_soft + (1 - alpha) * out_hard",
     "out = (1 - alpha) * out_soft + alpha * out_hard", "alpha weights the hard path"),
    ("eq2-scale-dropped", "dualpath.py", "return y + scale * torch.matmul(", "return y + torch.matmul(",
     "the LoRA's scale s is dropped"),
    ("eq5-self-attn-hard-lora", "dualpath.py",
     "k_h, v_h = attn.to_k(ctx), attn.to_v(ctx)\n", "k_h, v_h = add_lora(attn.to_k(ctx), ctx, lk, lora_scale), attn.to_v(ctx)\n",
     "attn1's hard path gets the LoRA on k"),

    # --- concept file, export, evaluation ------------------------------------------------------
    ("concept-alpha-not-stored", "model.py", None, None, "the concept records alpha 0.25 whatever it was tuned with"),
    ("export-kohya-alpha", "export.py", "torch.tensor(float(down.shape[0]))  # alpha = r: scale 1",
     "torch.tensor(1.0)  # alpha = r: scale 1", "kohya alpha 1 with rank r: Delta W scaled by 1/r"),
    ("eval-se-no-sqrt-n", "cmdline.py", "se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0",
     "se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0",
     "the standard error is the standard deviation"),
    ("eval-clip-t-with-placeholder", "evaluate.py", "    return prompt.replace(placeholder, noun)", "    return prompt",
     "CLIP-T scores the prompt with S* in it instead of the class noun"),
    ("eval-identity-unnormalised", "evaluate.py",
     "return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)",
     "return self.model.encode_image(x).float()", "CLIP-I on unnormalised embeddings (not a cosine)"),
    ("eval-no-dual-path-alpha", "evaluate.py", "        tc.alpha_blend = 1.0", "        tc.alpha_blend = 0.25",
     "the no_dual_path variant still uses the dual path"),
    ("eval-no-tuning-steps", "evaluate.py", "        tc.steps = 0", "        tc.steps = 1",
     "the no_tuning variant makes one step"),
    # --- the rest: data, losses, validation, command-line plumbing, the toy world ------------------
    ("data-first-box", "data.py", "if area > 0 and (row[\"ImageID\"] not in best or area > best[row[\"ImageID\"]][0]):",
     "if area > 0 and row[\"ImageID\"] not in best:", "OpenImages: the first box, not the largest (Sec. 5.1)"),
    ("data-no-exif", "data.py", "                im = ImageOps.exif_transpose(im)\n", "", "EXIF rotation ignored"),
    ("loss-anchor-abs", "losses.py", "term = (x.float() - x0.detach().float()).pow(2).sum()",
     "term = (x.float() - x0.detach().float()).abs().sum()", "the anchor is an L1, not an L2"),
    ("loss-eq4-sum", "losses.py", "return v.float().pow(2).sum(-1).mean()  # Eq. (4)", "return v.float().pow(2).sum()  # Eq. (4)",
     "Eq. (4) summed over the batch, not averaged"),
    ("loss-nearest-cosine-farthest", "losses.py", "nn_ids, _ = nearest_tokens(v, token_table, k=1, exclude=exclude_ids)  # (N, 1), no grad",
     "nn_ids, _ = nearest_tokens(-v, token_table, k=1, exclude=exclude_ids)  # (N, 1), no grad",
     "the nearest-cosine regulariser pulls toward the farthest token"),
    ("val-swap-is-self", "pretrain.py", "[(i + 1) % n for i in range(n)]", "list(range(n))",
     "the validation signal's 'swapped' concept is the image's own"),
    ("val-different-noise", "pretrain.py", "g = torch.Generator(device).manual_seed(10_000 + i)  # the same noise, t, prompts for every partner",
     "g = torch.Generator(device).manual_seed(10_000 + i + j)  # the same noise, t, prompts for every partner",
     "matched and swapped see different noise and t"),
    ("model-token-norm-mean", "model.py", "    return table[keep].norm(dim=-1).median().item()",
     "    return table.norm(dim=-1).max().item()",
     "v*'s starting norm is the table's largest row norm, special tokens included"),
    ("model-concept-width-unchecked", "model.py", "    if D != arch.text_width:", "    if False:",
     "a concept's v* of another width reaches the text encoder"),
    ("model-encoder-nan-accepted", "model.py", "        check_tensor(t, path, f\"{what}[{k!r}]\")", "        pass",
     "an encoder checkpoint's NaN or wrongly typed tensor is loaded"),
    ("pretrain-t-min-ignored", "pretrain.py", "    if not cfg.t_min:\n        return None", "    if True:\n        return None",
     "--t-min never reaches Eq. (1)'s t"),
    ("pretrain-resume-auto-no-fallback", "pretrain.py", "        if cfg.resume != \"auto\":", "        if True:",
     "--resume auto stops at a damaged encoder.pt instead of using the newest good one"),
    ("model-slot-off-by-one", "model.py", "                slots.append(len(row))\n", "                slots.append(len(row) - 1)\n",
     "the soft token lands one slot before the placeholder"),
    ("model-concept-nan-accepted", "model.py", "    if t.numel() and not torch.isfinite(t).all():",
     "    if False:", "a concept file with NaNs is accepted"),
    ("cli-user-error-exit-1", "cmdline.py", "        return 2\n", "        return 1\n", "bad input exits 1, not 2"),
    ("cli-nan-accepted", "cmdline.py", "    if not math.isfinite(x):", "    if False:", "--lr nan is accepted"),
    ("cli-tmp-left-behind", "cmdline.py", "        if os.path.exists(tmp):\n            os.remove(tmp)\n", "        pass\n",
     "a failed write leaves its temp file behind"),
    ("toy-caption-names-instance", "toyworld.py", "    text = template.format(f\"a {obj_size} {cls}\" if obj_size else f\"a {cls}\")",
     "    text = template.format(f\"a {obj_size} {cls}\" if obj_size else f\"a {cls}\") + \" with a pattern\"",
     "toy captions say more than class and context"),
]


def _replace_once(text: str, old: str, new: str) -> str:
    n = text.count(old)
    if n != 1:
        raise SystemExit(f"plant_bugs.py: {old[:60]!r} occurs {n} times (expected once): update the bug list")
    return text.replace(old, new, 1)


SPECIAL_EDITS = {
    # the sampler gives every rank rank 0's indices
    "ddp-same-shard": ("data.py", "    def __init__(self, n: int, world: int, rank: int, seed: int, epoch: int, skip: int = 0):\n",
                       "    def __init__(self, n: int, world: int, rank: int, seed: int, epoch: int, skip: int = 0):\n"
                       "        rank = 0\n"),
    # make_concept ignores the alpha it is given
    "concept-alpha-not-stored": ("model.py", '        "alpha_blend": float(alpha_blend),', '        "alpha_blend": 0.25,'),
}


def plant(tree: str, bug) -> None:
    bug_id, path, old, new, _ = bug
    if old is None:
        path, old, new = SPECIAL_EDITS[bug_id]
    full = os.path.join(tree, path)
    with open(full) as f:
        text = f.read()
    with open(full, "w") as f:
        f.write(_replace_once(text, old, new))


def copy_tree(dst: str, root: str = ROOT) -> None:
    """The repository's files (tracked, or new and not ignored) from `root` into dst."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = os.path.join(root, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))


LAST_OUTPUT = ""

# The test files to run first for a bug in each source file (only to stop sooner: every
# file runs when none of these catches the bug).
FIRST = {
    "tune.py": ["test_wiring.py", "test_personalise.py", "test_experiments.py"],
    "pretrain.py": ["test_wiring.py", "test_pretrain.py", "test_experiments.py"],
    "model.py": ["test_wiring.py", "test_core.py", "test_personalise.py"],
    "data.py": ["test_wiring.py", "test_pretrain.py"],
    "losses.py": ["test_losses.py", "test_wiring.py"],
    "dualpath.py": ["test_core.py", "test_wiring.py"],
    "sample.py": ["test_wiring.py", "test_personalise.py"],
    "evaluate.py": ["test_wiring.py", "test_evaluate.py", "test_experiments.py"],
    "export.py": ["test_export.py"],
    "cmdline.py": ["test_wiring.py", "test_failures.py"],
    "toyworld.py": ["test_toyworld.py"],
}


def test_files(tree: str, source: str) -> list[str]:
    every = sorted(f for f in os.listdir(os.path.join(tree, "tests")) if f.startswith("test_") and f.endswith(".py"))
    first = [f for f in FIRST.get(source, []) if f in every]
    return [os.path.join("tests", f) for f in first + [f for f in every if f not in first]]


def run_suite(tree: str, source: str, timeout: int) -> tuple[str, float]:
    """(first failing test or "", seconds). A failure's output is kept in LAST_OUTPUT."""
    global LAST_OUTPUT
    t0 = time.time()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-p", "no:cacheprovider",
                              *test_files(tree, source)], cwd=tree,
                             capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return "(timed out)", time.time() - t0
    seconds = time.time() - t0
    LAST_OUTPUT = out.stdout[-3000:]
    if out.returncode == 0:
        return "", seconds
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)
    if out.returncode != 1 or not m:  # not a failing test: the harness itself is broken
        raise SystemExit(f"plant_bugs.py: pytest exited {out.returncode} without a failing test:\n{out.stdout[-2000:]}"
                         f"{out.stderr[-2000:]}")
    return m.group(1), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plant one bug at a time in a copy of the tree and run the test suite.")
    p.add_argument("--only", default="", help="run the bugs whose id starts with this (comma list)")
    p.add_argument("--list", action="store_true", help="list the bugs and exit")
    p.add_argument("--timeout", type=int, default=900, help="seconds per suite run")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "plant_bugs.json"), help="JSON results")
    a = p.parse_args(argv)
    prefixes = [s for s in a.only.split(",") if s]
    bugs = [b for b in BUGS if not prefixes or any(b[0].startswith(s) for s in prefixes)]
    if a.list:  # (also checks that every edit still matches the code exactly once)
        with tempfile.TemporaryDirectory(prefix="plant_") as tree:
            copy_tree(tree)
            for b in bugs:
                path = b[1] if b[2] is not None else SPECIAL_EDITS[b[0]][0]
                shutil.copy2(os.path.join(ROOT, path), os.path.join(tree, path))
                plant(tree, b)
        for b in bugs:
            print(f"{b[0]:34s} {b[1]:12s} {b[4]}")
        return 0
    # One snapshot of the tree at the start, so that editing the code during a long run changes nothing.
    snapshot = tempfile.mkdtemp(prefix="plant_snapshot_")
    copy_tree(snapshot)
    with tempfile.TemporaryDirectory(prefix="plant_") as tree:  # the unplanted suite must pass first
        copy_tree(tree, snapshot)
        failed, seconds = run_suite(tree, "", a.timeout)
    if failed:
        raise SystemExit(f"plant_bugs.py: the suite fails without any planted bug ({failed}):\n{LAST_OUTPUT}")
    print(f"unplanted suite: passed in {seconds:.0f} s", flush=True)
    results = []
    for bug in bugs:
        with tempfile.TemporaryDirectory(prefix="plant_") as tree:
            copy_tree(tree, snapshot)
            plant(tree, bug)
            source = bug[1] if bug[2] is not None else SPECIAL_EDITS[bug[0]][0]
            caught_by, seconds = run_suite(tree, source, a.timeout)
        results.append({"id": bug[0], "file": source, "bug": bug[4],
                        "caught_by": caught_by, "seconds": round(seconds, 1)})
        print(f"{bug[0]:34s} {'CAUGHT by ' + caught_by if caught_by else 'SURVIVED'}  ({seconds:.0f} s)", flush=True)
    shutil.rmtree(snapshot, ignore_errors=True)
    caught = sum(1 for r in results if r["caught_by"])
    print(f"\n{caught}/{len(results)} planted bugs caught")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"caught": caught, "total": len(results), "results": results}, f, indent=1)
    print("\n| bug | file | caught by |\n|---|---|---|")
    for r in results:
        print(f"| {r['bug']} (`{r['id']}`) | {r['file']} | {('`' + r['caught_by'] + '`') if r['caught_by'] else '**survived**'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
