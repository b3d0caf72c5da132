"""
tune.py -- personalise Stable Diffusion to one photo: one encoder forward, then <= 12 steps.

Sec. 4.4 and Sec. 5.1 ("Inference-tuning Phase"):
  1) one forward pass of the pre-trained tuning-encoder gives v0 (the word embedding of S*)
     and A0, B0 (a LoRA offset for each of the 96 q/k/v projections, Eq. 2);
  2) a short LoRA-tuning run from that initialisation (lr 2e-3, alpha_blend 0.25, <= 12 steps)
     with the denoising loss Eq. (1) through the dual-path UNet (Eq. 5), plus an L2 term that
     keeps v, A, B close to the encoder's prediction (Sec. 4.4). The hard token of C_h stays the
     nearest word of the encoder's prediction v0 (Sec. 4.3; --hard-token tuned lets it follow v).
The result is a small concept file (see model.make_concept), never a whole UNet.

    python tune.py --image x.jpg --out concept.pt                    # sd15, real weights
    python tune.py --preset tiny --encoder random --image examples/concept.png --out concept.pt
    python tune.py --preset sd15-arch --encoder random --image examples/concept.png \
        --batch-size 16 --steps 12 --benchmark                        # GPU speed/memory figures
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import cmdline
import data as data_lib
import dualpath
import losses
import model


@dataclass
class Config:
    image: str = ""  # the one photo of the concept (required)
    out: str = "concept.pt"  # the concept file to write
    encoder: str = "runs/pretrain/encoder.pt"  # pretrain.py checkpoint, or "random" (untrained; smoke runs)
    preset: str | None = None  # default: the one recorded in the encoder checkpoint (sd15 for random)
    steps: int = 12  # Sec. 5.1: "up to 12 optimization steps"; 0 = the raw encoder prediction
    lr: float = 2e-3  # Sec. 5.1
    batch_size: int = 16  # augmented views per step (E4T's recommended minimum, Sec. 4.4)
    alpha_blend: float = 0.25  # Eq. (5), Sec. 5.1
    lambda_anchor: float = 0.01  # Sec. 4.4 L2 to the encoder's prediction (the paper gives no value)
    hard_token: str = "encoder"  # C_h's word (Sec. 4.3): the encoder prediction's nearest, kept; "tuned": tuned v*'s
    encoder_timestep: int = 500  # t of the noisy latent fed to the encoder's UNet branch (one forward)
    hypernet: bool = True  # False: LoRA starts at zero (A random, B = 0), only v0 comes from the encoder
    placeholder: str = model.PLACEHOLDER  # the word that stands for the concept in prompts
    seed: int = 0  # fixes every random choice (noise, t, prompts, augmentation, initialisation)
    grad_checkpointing: bool | None = None  # default: on for CUDA (lower peak memory), off on CPU
    device: str | None = None  # default: cuda if available, else cpu
    base: str = model.SD15_BASE  # sd15 only: SD 1.5 hub id or folder
    clip: str = model.SD15_CLIP[1]  # sd15 only: open_clip tag or file for ViT-H-14
    benchmark: bool = False  # end with one JSON line of timings and peak memory


UserError = cmdline.UserError  # bad input: one line on stderr, exit code 2

# Where the hard token v_h of C_h (Eq. 5) comes from while tuning. NOTE: Sec. 4.3 takes v_h as "the
# nearest hard-token embedding to the model's prediction v*", and Sec. 4.4 does not say whether it
# moves when the tuning run moves v*. We keep the encoder prediction's word ("encoder"): the hard
# path is the one meant to keep the model's prior, and a 12-step fit to one photo should refine the
# soft path (v*, Delta W), not swap the word the other 75 % of each attention output draws. In the
# toy world 12 steps at the default anchor moved v* by about half its length and replaced the class
# word by a template word ("good", "small", "image") for 4 of 12 concepts, which was all that
# tuning changed in the pictures (class drawn 92 % -> 65 %); "tuned" keeps that behaviour.
HARD_TOKEN_CHOICES = ("encoder", "tuned")


def check_hard_token(value: str):
    """--hard-token (tune.py and evaluate.py): one of HARD_TOKEN_CHOICES, else UserError."""
    if value not in HARD_TOKEN_CHOICES:
        raise UserError(f"--hard-token must be one of {', '.join(HARD_TOKEN_CHOICES)}, got {value!r}")


def parse_args(argv=None) -> Config:
    p = cmdline.config_parser(Config, __doc__.split("\n\n")[0].strip(), required=("image",),
                              choices={"preset": model.PRESETS, "hard_token": HARD_TOKEN_CHOICES})
    return Config(**vars(p.parse_args(argv)))


def check_config(cfg: Config):
    if cfg.steps < 0:
        raise UserError(f"--steps must be >= 0, got {cfg.steps}")
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {cfg.batch_size}")
    if not 0.0 <= cfg.alpha_blend <= 1.0:
        raise UserError(f"--alpha-blend must be in [0, 1], got {cfg.alpha_blend}")
    if not cfg.placeholder.strip():
        raise UserError("--placeholder must not be empty")
    if not (cfg.lr > 0 and cfg.lambda_anchor >= 0):
        raise UserError(f"--lr must be positive and --lambda-anchor >= 0, got {cfg.lr} and {cfg.lambda_anchor}")
    check_hard_token(cfg.hard_token)
    cmdline.check_encoder_timestep(cfg.encoder_timestep)


def load_encoder_checkpoint(cfg: Config, prog: str = "tune.py"):
    """(checkpoint or None for 'random', preset) -- with one-line errors for the usual mistakes."""
    if cfg.encoder == "random":
        print(f"{prog}: warning: --encoder random: an untrained encoder (smoke runs and ablations only)",
              file=sys.stderr)
        return None, cfg.preset or "sd15"
    if not os.path.isfile(cfg.encoder):
        raise UserError(f"no encoder checkpoint at {cfg.encoder}; train one with `python pretrain.py --data DIR "
                        f"--out {os.path.dirname(cfg.encoder) or '.'}` or pass --encoder random")
    try:
        ckpt = model.load_encoder_checkpoint(cfg.encoder)
        model.check_same_weights(f"the encoder {cfg.encoder}", ckpt, cfg.base, cfg.clip)
    except ValueError as e:
        raise UserError(str(e)) from None
    preset = cfg.preset or ckpt["preset"]
    if preset != ckpt["preset"]:
        raise UserError(f"the encoder checkpoint {cfg.encoder} is for preset {ckpt['preset']!r}, not {preset!r}")
    return ckpt, preset


def describe_encoder(ckpt) -> str:
    """One line on how an encoder was pre-trained (Sec. 5.2 regulariser, Sec. 5.4 hypernetwork)."""
    if ckpt is None:
        return "encoder: random (untrained)"
    c = ckpt.get("config", {})
    reg = c.get("embedding_reg", "contrastive")
    return (f"encoder: {ckpt['step']} pre-training steps, embedding regulariser {reg}, "
            f"hypernetwork {'yes' if ckpt.get('hypernet', True) else 'no (Sec. 5.4 ablation)'}")


def load_models(preset: str, device, base: str, clip: str, grad_checkpointing: bool | None = None):
    """The frozen parts set up for tuning, exactly as every tuning run uses them (tune.py and
    evaluate.py both come here): TF32 on CUDA, frozen weights in frozen_dtype, the dual-path
    processors, and gradient checkpointing (default: on for CUDA, off on CPU).
    Returns (components, LoRA layer names)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    comps = model.load_components(preset, device=device, dtype=model.frozen_dtype(device), base=base, clip=clip)
    names = dualpath.install_dual_path(comps.unet)
    if grad_checkpointing if grad_checkpointing is not None else device.type == "cuda":
        comps.unet.enable_gradient_checkpointing()
    return comps, names


def build_tuning_encoder(ckpt, comps, names, seed: int, path: str = "the encoder checkpoint") -> model.TuningEncoder:
    """The encoder of a checkpoint (checked against these components first: a damaged or foreign
    file is a one-line UserError), or a seeded random one for ckpt None."""
    if ckpt is None:
        torch.manual_seed(seed)
        return model.build_encoder(comps, names)
    try:
        return model.encoder_from_checkpoint(ckpt, comps, path, names)
    except ValueError as e:
        raise UserError(str(e)) from None


def view_latents(comps, image, n: int, seed: int, augment: bool = True, chunk: int = 4) -> torch.Tensor:
    """VAE latents of n views of one image (augmented with views seeded by `seed`), computed once."""
    device = comps.token_table.device
    rng = random.Random(seed)
    res, clip_size = comps.cfg.resolution, comps.cfg.clip_size
    views = [data_lib.make_views(image, res, clip_size, rng if augment else None)[0] for _ in range(n)]
    g = torch.Generator(device).manual_seed(seed)
    out = [model.vae_latents(comps.vae, torch.stack(views[i : i + chunk]).to(device), g) for i in range(0, n, chunk)]
    return torch.cat(out).float()  # (n, 4, R/8, R/8)


def lora_from_zero(comps, names: list[str], seed: int) -> dict:
    """Plain LoRA initialisation (Hu et al.): A ~ N(0, 1/D_in), B = 0, so Delta W = 0. (1, ...) each."""
    device = comps.token_table.device
    gen = torch.Generator(device).manual_seed(seed)
    r = comps.cfg.lora_rank
    return {name: (torch.randn((1, din, r), generator=gen, device=device) / din ** 0.5,
                   torch.zeros((1, r, dout), device=device))
            for name, (din, dout) in zip(names, model.lora_shapes(comps.unet, names))}


def optimise(comps, latents, v0, lora0, *, steps: int, lr_v: float, lr_lora: float, alpha: float,
             lambda_anchor: float, seed: int, placeholder: str, log=print, on_step=None, hard_ids=None):
    """AdamW on v and every (A, B), from (v0, lora0), on fixed clean latents of the views.

    Each step: fresh noise and t, fresh prompt templates, then Eq. (1) through the dual-path
    UNet (Eq. 5) -- the hard token of C_h is hard_ids (1,) where given (tune_concept passes v0's
    nearest word), else v's nearest real token *at this step* -- plus
    lambda_anchor * ||(v, A, B) - (v0, A0, B0)||^2 (Sec. 4.4; 0 turns it off, as for the
    baselines). A non-finite loss stops the run (UserError). on_step(step index, loss), if given,
    runs after each step (demo.py draws the losses live; an exception there stops the run).
    Returns (v, lora, per-step losses, seconds).
    """
    device = latents.device
    v = v0.clone().requires_grad_(True)
    lora = {k: (A.clone().requires_grad_(True), B.clone().requires_grad_(True)) for k, (A, B) in lora0.items()}
    lora_params = [p for AB in lora.values() for p in AB]
    params, anchors = [v] + lora_params, [v0] + [p for AB in lora0.values() for p in AB]
    groups = [{"params": [v], "lr": lr_v}] + ([{"params": lora_params, "lr": lr_lora}] if lora_params else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    step_losses = []
    cmdline.sync(device)
    t0 = time.perf_counter()
    with tqdm(total=steps, desc="tune", leave=False, disable=steps < 50) as bar:  # (closed on Ctrl-C too)
        for step in range(steps):
            # Seeds: one stream per step for the noise and t, another for the prompt templates.
            # The multipliers (primes) only keep the streams of different --seed values apart.
            gstep = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
            z_t, t, _, target = model.noisy_latents(comps.noise_scheduler, latents, gstep)
            prompts = data_lib.make_prompts(len(latents), random.Random(seed * 7_919 + step), placeholder)
            pred = model.dual_path_prediction(comps, z_t, t, prompts, v, lora, alpha, placeholder, hard_ids)  # Eq. (5)
            diff = losses.diffusion_loss(pred, target)  # Eq. (1)
            loss = diff + lambda_anchor * losses.anchor_l2(params, anchors) if lambda_anchor else diff  # Sec. 4.4
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_losses.append(loss.item())
            if not math.isfinite(step_losses[-1]):
                raise UserError(f"the loss became {step_losses[-1]} at step {step + 1}: lower --lr")
            log(f"step {step + 1}/{steps}  loss {step_losses[-1]:.5f}  (Eq. 1: {diff.item():.5f})")
            if on_step is not None:
                on_step(step, step_losses[-1])
            bar.update(1)
    cmdline.sync(device)
    lora = {k: (A.detach(), B.detach()) for k, (A, B) in lora.items()}
    return v.detach(), lora, step_losses, time.perf_counter() - t0


def tune_concept(comps, encoder, image, cfg: Config, release_backbone: bool = False, log=print, on_step=None):
    """One photo -> (concept dict, stats dict). The plain function behind `python tune.py`.

    comps: from load_models (dual-path processors installed); encoder: TuningEncoder on the
    same device; image: a PIL RGB image. release_backbone=True drops the CLIP image tower and
    the encoder after the one forward pass (the tuning loop needs neither). on_step(step, loss):
    see optimise.
    """
    device = comps.token_table.device
    t0 = time.perf_counter()
    names, trained_hypernet = encoder.layer_names, encoder.hypernet

    # 1) One encoder forward on the centre view -> v0, A0, B0 (Sec. 4.4).
    vae_view, clip_view = data_lib.make_views(image, comps.cfg.resolution, comps.cfg.clip_size, rng=None)
    g = torch.Generator(device).manual_seed(cfg.seed)
    z0 = model.vae_latents(comps.vae, vae_view[None].to(device), g).float()
    t_enc = torch.tensor([cfg.encoder_timestep], device=device)
    z_t, _, _, _ = model.noisy_latents(comps.noise_scheduler, z0, g, t=t_enc)
    with torch.no_grad(), model.autocast(device):
        v0, lora0 = model.encode(encoder, comps, clip_view[None].to(device), z_t, t_enc)
    v0 = v0.float().detach()  # (1, D)
    lora0 = {k: (A.float().detach(), B.float().detach()) for k, (A, B) in lora0.items()}
    if not (cfg.hypernet and trained_hypernet):
        # An encoder trained without a hypernetwork (Sec. 5.4), or --no-hypernet: the LoRA
        # starts from zero and only v0 comes from the encoder.
        lora0 = lora_from_zero(comps, names, cfg.seed + 1)
    if release_backbone:
        comps.image_encoder = None
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cmdline.sync(device)
    encoder_s = time.perf_counter() - t0

    # 2) Latents of the augmented views, computed once.
    latents = view_latents(comps, image, cfg.batch_size, cfg.seed + 2) if cfg.steps > 0 else None

    # 3) <= 12 steps of AdamW on v, A, B only (Sec. 4.4), dual path with alpha (Eq. 5); C_h holds
    #    the encoder prediction's nearest word throughout (HARD_TOKEN_CHOICES), unless --hard-token tuned.
    start_ids = model.nearest_tokens(v0, comps.token_table, k=1)[0][:, 0]  # v0's nearest word, (1,)
    hard_ids = start_ids if cfg.hard_token == "encoder" else None
    v, lora, step_losses, loop_s = optimise(comps, latents, v0, lora0, steps=cfg.steps, lr_v=cfg.lr, lr_lora=cfg.lr,
                                            alpha=cfg.alpha_blend, lambda_anchor=cfg.lambda_anchor, seed=cfg.seed,
                                            placeholder=cfg.placeholder, log=log, on_step=on_step,
                                            hard_ids=hard_ids) if cfg.steps else (v0, lora0, [], 0.0)

    # 4) The concept file's content, with how far tuning moved v* and the word it started from: at
    #    alpha = 0.25 the hard path (75 % of each attention output) draws the class, so with
    #    --hard-token tuned a v* whose nearest word is no longer the class noun can lose the class.
    total_s = time.perf_counter() - t0
    tuning = {"method": "date", "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
              "lambda_anchor": cfg.lambda_anchor, "hard_token": cfg.hard_token,
              "hypernet": cfg.hypernet and trained_hypernet, "encoder": cfg.encoder,
              "image": os.path.basename(cfg.image) if cfg.image else "", "seconds": total_s,
              "start_token": model.token_word(comps.tokenizer, int(start_ids[0])),
              "v_shift": ((v.float() - v0).norm() / v0.norm().clamp_min(1e-12)).item()}
    concept = model.make_concept(comps, v, lora, cfg.placeholder, cfg.alpha_blend, tuning, step_losses,
                                 token_id=None if hard_ids is None else int(hard_ids[0]))
    stats = {"encoder_s": encoder_s, "tune_loop_s": loop_s, "total_s": total_s, "losses": step_losses}
    return concept, stats


# The one-image baselines of Fig. 5a, tuned through the same loop as DATE on their references' batch.
BASELINES = {
    # diffusers' textual_inversion example: 3000 steps at lr 5e-4 (its README), only v trained.
    # Its batch: 1 image x 4 gradient-accumulation steps, i.e. 4 views a step.
    "textual_inversion": dict(steps=3000, lr=5e-4, batch_size=4),
    # LoRA(-PTI): Sec. 5.1 quotes 2,000 steps; lr 1e-4 for the LoRA and 5e-4 for v are
    # cloneofsimo/lora's PTI defaults (its learning_rate_unet / learning_rate_ti); its PTI example
    # trains on 1 image x 4 gradient-accumulation steps as well.
    "lora": dict(steps=2000, lr=1e-4, lr_v=5e-4, batch_size=4),
}


def init_embedding(comps, word: str) -> torch.Tensor:
    """Mean token embedding of a word (its class noun), (1, D): where textual inversion starts."""
    ids = list(model.tokenize_ids(comps.tokenizer, word))
    if not ids:
        raise UserError(f"the initial word {word!r} has no tokens")
    return comps.token_table.detach().float()[ids].mean(0, keepdim=True)


def baseline_concept(comps, image, kind: str, init_word: str, *, steps: int, lr: float, batch_size: int | None = None,
                     seed: int = 0, placeholder: str = model.PLACEHOLDER, log=print):
    """A one-image baseline of Fig. 5a as a concept file sample.py can use (alpha = 1: one path).

    kind "textual_inversion": only v, from the class noun's embedding (Gal et al. 2022).
    kind "lora": v from the noun plus a LoRA from zero on the same 96 projections (LoRA-PTI,
    trained jointly here rather than in two phases). No anchor, no encoder. batch_size: augmented
    views a step (default: the reference's, BASELINES[kind]["batch_size"]).
    """
    t0 = time.perf_counter()
    batch_size = BASELINES[kind]["batch_size"] if batch_size is None else batch_size
    latents = view_latents(comps, image, batch_size, seed + 2)
    v0 = init_embedding(comps, init_word)
    lora0 = lora_from_zero(comps, dualpath.lora_layer_names(comps.unet), seed + 1) if kind == "lora" else {}
    lr_v = BASELINES[kind].get("lr_v", lr) if kind == "lora" else lr
    v, lora, step_losses, loop_s = optimise(comps, latents, v0, lora0, steps=steps, lr_v=lr_v, lr_lora=lr, alpha=1.0,
                                            lambda_anchor=0.0, seed=seed, placeholder=placeholder, log=log)
    total_s = time.perf_counter() - t0
    tuning = {"method": kind, "steps": steps, "lr": lr, "lr_v": lr_v, "batch_size": batch_size, "seed": seed,
              "init_word": init_word, "seconds": total_s}
    concept = model.make_concept(comps, v, lora, placeholder, 1.0, tuning, step_losses)
    return concept, {"tune_loop_s": loop_s, "total_s": total_s, "losses": step_losses}


def main(cfg: Config):
    # 1) Check every input before any heavy work.
    check_config(cfg)
    try:
        image = data_lib.load_image(cfg.image)
    except data_lib.BadImage as e:
        raise UserError(str(e)) from None
    ckpt, preset = load_encoder_checkpoint(cfg)
    cmdline.check_output(cfg.out, "file")  # (a missing parent folder is created when the file is written)
    device = cmdline.resolve_device(cfg.device)

    # 2) Frozen parts (bf16 on CUDA) and the encoder (its checkpoint checked against them: a
    #    damaged or foreign file stops here with one line).
    comps, names = load_models(preset, device, cfg.base, cfg.clip, cfg.grad_checkpointing)
    held = [build_tuning_encoder(ckpt, comps, names, cfg.seed, cfg.encoder).to(device)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(f"tune.py: {describe_encoder(ckpt)}", file=sys.stderr)

    # 3) Tune. Only tune_concept holds the encoder (held.pop() hands over the one reference), so
    #    it and the CLIP tower leave memory right after their one forward pass.
    concept, stats = tune_concept(comps, held.pop(), image, cfg, release_backbone=True,
                                  log=lambda s: print(s, file=sys.stderr))
    del ckpt

    # 4) Write the concept file atomically and report.
    t_save = time.perf_counter()
    cmdline.atomic_save(concept, cfg.out)
    total_s = stats["total_s"] + time.perf_counter() - t_save
    peak = cmdline.peak_memory_gb(device)
    first = f"{concept['first_loss']:.5f}" if concept["first_loss"] is not None else "-"
    last = f"{concept['final_loss']:.5f}" if concept["final_loss"] is not None else "-"
    print(f"wrote {cfg.out} ({os.path.getsize(cfg.out) / 1e6:.2f} MB): {cfg.steps} steps, loss {first} -> {last}, "
          f"nearest token {concept['token']!r}, {total_s:.2f} s, peak {peak:.2f} GB ({cmdline.device_name(device)})")
    print("v* reads as: " + ", ".join(f"{w} {c:.3f}" for w, c in concept["nearest_words"]))  # Sec. 4.2
    if cfg.steps:
        tuned, now = concept["tuning"], concept["nearest_words"][0][0]
        changed = tuned["start_token"] != now
        print(f"tuning moved v* by {100 * tuned['v_shift']:.0f} % of its norm; its nearest word "
              f"{tuned['start_token']!r} -> {now!r}" + (" (changed)" if changed else "")
              + f"; hard token {concept['token']!r}" + (" (the encoder's)" if tuned["hard_token"] == "encoder" else ""))
    if cfg.benchmark:
        print(json.dumps({"what": "tune", "preset": preset, "device": cmdline.device_name(device), "steps": cfg.steps,
                          "batch_size": cfg.batch_size, "encoder_s": round(stats["encoder_s"], 4),
                          "tune_loop_s": round(stats["tune_loop_s"], 4), "total_s": round(total_s, 4),
                          "peak_gb": round(peak, 3)}))
    return concept


def cli(argv=None) -> int:
    return cmdline.run_cli("tune.py", main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
