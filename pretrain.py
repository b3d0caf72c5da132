"""
pretrain.py -- pre-train the tuning-encoder on a large image set (Sec. 4, Sec. 5.1).

One step (Sec. 4): VAE latents and CLIP view of each image; noise and t; the encoder predicts
v*, A, B (Sec. 4.1, Eq. 2); the nearest real token gives the hard prompt C_h (Sec. 4.3);
the dual-path UNet (Eq. 5) predicts the noise; the loss is
    Eq. (1) + lambda_c * Eq. (3) + lambda_e * Eq. (4) + lambda_w * sum_layers ||A B||^2 (Sec. 4.1)
with Eq. (3)'s negatives gathered from all ranks. AdamW, linear warm-up then cosine decay
(Sec. 5.1: lr 1e-4, 150k steps; 50k for ablations).

Launch
    python pretrain.py --preset tiny --data synthetic --steps 200 --batch-size 4     # CPU smoke run
    torchrun --nproc_per_node=8 pretrain.py --data /data/imagenet/train --openimages /data/openimages
    python pretrain.py ... --resume auto            # continue from OUT/encoder.pt

Writes OUT/encoder.pt (latest; what tune.py reads), OUT/encoder_{step:07d}.pt every
--save-every steps, and OUT/log.jsonl (one JSON line per log step). Ctrl-C saves first.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cmdline
import data as data_lib
import dualpath
import losses
import model

EMBEDDING_REGS = ("contrastive", "nearest-cosine", "l2", "none")


@dataclass
class Config:
    preset: str = "sd15"  # sd15 (real weights) | sd15-arch (random, benchmarks) | tiny (tests, CPU)
    data: str | None = None  # ImageNet-style folder, or "synthetic"
    openimages: str | None = None  # OpenImages folder: images + box CSV (largest box is cropped)
    out: str = "runs/pretrain"  # checkpoints and log.jsonl go here
    steps: int = 150_000  # Sec. 5.1: 150k for the final model (50k for ablations)
    batch_size: int = 16  # per process
    lr: float = 1e-4  # Sec. 5.1
    warmup_steps: int = 1_000  # linear warm-up, then cosine decay to 0 (Sec. 5.1)
    weight_decay: float = 0.01  # AdamW
    grad_clip: float = 1.0  # max global grad norm
    save_every: int = 5_000  # also writes encoder_{step:07d}.pt
    log_every: int = 50  # one JSON line in log.jsonl per this many steps
    resume: str | None = None  # a checkpoint path, or "auto" = OUT/encoder.pt if it exists
    stop_at: int | None = None  # end this run after this step (checkpointed), e.g. to fit a job slot
    seed: int = 0  # fixes every random choice (noise, t, prompts, augmentation, initialisation)
    grad_checkpointing: bool = False  # trade compute for memory in the UNet
    alpha_blend: float = 0.25  # Eq. (5) alpha during pre-training (as in tuning, Sec. 5.1)
    embedding_reg: str = "contrastive"  # Sec. 5.2: contrastive = Eq. 3 + 4, nearest-cosine (+ Eq. 4), l2 = Eq. 4, none
    hypernet: bool = True  # --no-hypernet: token head only, no predicted LoRA (Sec. 5.4 ablation)
    encoder_timestep: int | None = None  # encoder's UNet input: default the z_t Eq. (1) scores (E4T); T: z0 at t=T
    t_min: int = 0  # Eq. (1)'s t uniform over [t_min, 1000) in training (0: every t, the usual; validation: every t)
    # Loss weights and Eq. (3) settings. The paper gives no values; these are ours.
    lambda_contrastive: float = 0.01  # Eq. (3)
    contrastive_from: int = 0  # Eq. (3) joins at this step; before it Eq. (4) alone (0: from the start)
    lambda_nearest: float = 0.01  # --embedding-reg nearest-cosine: weight of 1 - cos(v*, nearest token)
    lambda_embedding: float = 1e-3  # Eq. (4)
    lambda_hyper: float = 1e-4  # hyper-weight L2, summed over the 96 layers (Sec. 4.1)
    nn_k: int = 5  # |N(v*)|: nearest tokens used as positives in Eq. (3)
    tau: float = 0.07  # Eq. (3) temperature (on cosine similarities)
    num_workers: int = 4  # data-loader processes per rank
    base: str = model.SD15_BASE  # sd15: hub id or local folder of SD 1.5
    clip: str = model.SD15_CLIP[1]  # sd15: open_clip tag or local file for ViT-H-14
    val_images: str | None = None  # held-out folders, comma-separated: matched vs swapped, also split by class noun
    val_every: int = 500  # validate every this many steps (with --val-images), and at the end
    val_views: int = 4  # held-out augmented views per validation image
    val_concepts: str | None = None  # no training: the signal of concept files DIR/<image stem>.pt (calibration)
    benchmark: bool = False  # end with one JSON line of throughput and memory


def parse_args(argv=None) -> Config:
    p = cmdline.config_parser(Config, __doc__.split("\n\n")[0].strip(), required=(),
                              choices={"preset": model.PRESETS, "embedding_reg": EMBEDDING_REGS})
    return Config(**vars(p.parse_args(argv)))


def check_config(cfg: Config):
    """Reject bad flags before anything heavy (one line on stderr, exit code 2)."""
    if cfg.data is None and cfg.openimages is None:
        raise cmdline.UserError("give --data DIR, --data synthetic, or --openimages DIR")
    for flag, val in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--save-every", cfg.save_every),
                      ("--log-every", cfg.log_every)):
        if val <= 0:
            raise cmdline.UserError(f"{flag} must be positive, got {val}")
    if cfg.embedding_reg not in EMBEDDING_REGS:
        raise cmdline.UserError(f"--embedding-reg must be one of {', '.join(EMBEDDING_REGS)}, "
                                f"got {cfg.embedding_reg!r}")
    if cfg.data not in (None, data_lib.SYNTHETIC) and not os.path.isdir(cfg.data):
        raise cmdline.UserError(f"--data: no such folder: {cfg.data}")
    if cfg.openimages is not None and not os.path.isdir(cfg.openimages):
        raise cmdline.UserError(f"--openimages: no such folder: {cfg.openimages}")
    for folder in val_folders(cfg):
        if not os.path.isdir(folder):
            raise cmdline.UserError(f"--val-images: no such folder: {folder}")
    if cfg.encoder_timestep is not None:
        cmdline.check_encoder_timestep(cfg.encoder_timestep)
    cmdline.check_encoder_timestep(cfg.t_min, "--t-min")
    if cfg.contrastive_from < 0:
        raise cmdline.UserError(f"--contrastive-from must be >= 0, got {cfg.contrastive_from}")
    if cfg.val_every <= 0 or cfg.val_views <= 0:
        raise cmdline.UserError("--val-every and --val-views must be positive")
    if not cfg.lr > 0 or cfg.grad_clip <= 0 or cfg.warmup_steps < 0:
        raise cmdline.UserError("--lr and --grad-clip must be positive and --warmup-steps >= 0")
    cmdline.check_output(cfg.out, "folder")
    if cfg.resume not in (None, "auto") and not os.path.isfile(cfg.resume):
        raise cmdline.UserError(f"--resume: no such checkpoint: {cfg.resume}")


def lr_lambda(cfg: Config):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def gather_negatives(v: torch.Tensor, world: int, rank: int):
    """The other ranks' v' for Eq. (3)'s negatives, or None on one process.

    The gather is autograd-aware: each rank's loss also pushes the *other* ranks' v' away, and
    that gradient travels back to the rank that made v'. With a plain (detached) all_gather each
    v* would be pushed by the N-1 images of its own rank only, and 8 GPUs x 16 images would
    train a different loss than one GPU x 128. With this one, W ranks x N images give the same
    encoder gradient as one process x W*N (DDP averages, the loss is a mean over images).
    """
    if world == 1:
        return None
    parts = AllGatherWithGrad.apply(v)  # (world, N, D)
    return torch.cat([p for i, p in enumerate(parts) if i != rank])  # ((world-1) N, D)


class AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient that *every* rank's loss
    sent to its v (summed with an all_reduce), instead of none."""

    @staticmethod
    def forward(ctx, v):  # v (N, D) -> (world, N, D)
        parts = [torch.empty_like(v) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, v.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):  # grad (world, N, D): this rank's loss w.r.t. every rank's v
        grad = grad.contiguous()
        dist.all_reduce(grad)  # + what the other ranks' losses sent
        return grad[dist.get_rank()]


def embedding_terms(cfg: Config, v: torch.Tensor, token_table: torch.Tensor, world: int = 1, rank: int = 0,
                    step: int | None = None) -> dict:
    """The embedding regulariser chosen by --embedding-reg (Sec. 4.2, Sec. 5.2), as weighted terms.

    NOTE: --contrastive-from N leaves Eq. (3) out before step N (Eq. 4 alone; step None: the run's
    step is unknown, Eq. 3 applies). The paper gives no schedule for its weight. Eq. (3)'s positives
    are v*'s own nearest words, so it holds v* at whatever words are nearest when it starts: from
    an untrained encoder those are the same few words for every image. In the toy world (38 words)
    that was "a", "one", "background" for every concept, class words never; with Eq. (3) joining
    after v* had found its words under Eq. (1) + (4), it kept the class words and still kept the
    v* apart; where v* had not found them yet at step N, it held the rest on function words again
    (docs/miniature.md). Its negatives are every other picture of the batch, including pictures of
    the same class: in a 6-class toy world, about 2.5 of 15 in a batch of 16, which pushes two
    pictures of one class off their shared class word; with 1,000 ImageNet classes that is rare."""
    v = v.float()
    terms = {}
    contrastive_on = step is None or step >= cfg.contrastive_from
    if cfg.embedding_reg == "contrastive" and contrastive_on:  # Eq. (3), negatives from all ranks
        terms["contrastive"] = losses.nn_contrastive_loss(v, token_table, k=cfg.nn_k, tau=cfg.tau,
                                                          extra_negatives=gather_negatives(v, world, rank))
    elif cfg.embedding_reg == "nearest-cosine":  # Sec. 5.2's VQGAN-style alternative
        terms["nearest_cosine"] = losses.nearest_cosine_loss(v, token_table)
    if cfg.embedding_reg != "none":
        terms["embedding"] = losses.embedding_l2(v)  # Eq. (4)
    weights = {"contrastive": cfg.lambda_contrastive, "nearest_cosine": cfg.lambda_nearest,
               "embedding": cfg.lambda_embedding}
    return {k: (term, weights[k]) for k, term in terms.items()}


def step_seed(cfg: Config, step: int, rank: int) -> int:
    """Per-step, per-rank seed for noise, t and prompts: a resumed run replays them exactly.

    Distinct for every (seed, step, rank): 1_000_003 (a prime above any step count) keeps the
    steps of different --seed values apart, x 1024 leaves room for 1024 ranks, and the mask keeps
    the result a non-negative 47-bit integer, which torch.Generator.manual_seed accepts."""
    return ((cfg.seed * 1_000_003 + step) * 1_024 + rank) & 0x7FFFFFFFFFFF


def training_timesteps(cfg: Config, scheduler, n: int, g: torch.Generator) -> torch.Tensor | None:
    """Eq. (1)'s t for one training batch of n: None (the default, --t-min 0) lets noisy_latents
    draw it uniformly over all of the schedule's T steps, the usual reading of Eq. (1)'s E_t;
    --t-min m draws it uniformly over [m, T) instead. NOTE: Eq. (1) does not say how t is drawn
    (see README, "Choices the paper leaves open"); validation always scores every t."""
    if not cfg.t_min:
        return None
    return torch.randint(cfg.t_min, scheduler.config.num_train_timesteps, (n,), generator=g, device=g.device)


def pretrain_losses(cfg: Config, comps, encoder, batch, seed: int, world: int = 1, rank: int = 0,
                    step: int | None = None):
    """All loss terms of one pre-training step (Sec. 4). Returns a dict of scalar tensors."""
    device = comps.token_table.device
    g = torch.Generator(device).manual_seed(seed)
    images, clip_images = batch["vae"].to(device), batch["clip"].to(device)
    z0 = model.vae_latents(comps.vae, images, g).float()  # (N, 4, R/8, R/8)
    t = training_timesteps(cfg, comps.noise_scheduler, len(z0), g)  # None: noisy_latents draws any t
    z_t, t, _, target = model.noisy_latents(comps.noise_scheduler, z0, g, t=t)
    z_enc, t_enc = z_t, t  # E4T: the encoder sees the very noisy latent that Eq. (1) scores
    if cfg.encoder_timestep is not None:  # or, as tune.py's one forward: z0 at a fixed t, noise of its own
        t_enc = torch.full_like(t, cfg.encoder_timestep)
        z_enc, _, _, _ = model.noisy_latents(comps.noise_scheduler, z0, g, t=t_enc)
    with model.autocast(device):  # E(I_c, z_t, t): both backbones, then the trainable part
        v, lora = model.encode(encoder, comps, clip_images, z_enc, t_enc)  # (N, D), {name: (A, B)}
    prompts = data_lib.make_prompts(len(v), random.Random(seed))
    pred = model.dual_path_prediction(comps, z_t, t, prompts, v, lora, cfg.alpha_blend)  # Eq. (5)

    terms = {"diffusion": losses.diffusion_loss(pred, target)}  # Eq. (1)
    weighted = embedding_terms(cfg, v, comps.token_table, world, rank, step)  # Eq. (3), (4) or a Sec. 5.2 variant
    terms.update({k: term for k, (term, _) in weighted.items()})
    total = terms["diffusion"] + sum(w * term for term, w in weighted.values())
    if lora:
        terms["hyper"] = sum(losses.hyperweight_l2(A, B) for A, B in lora.values())  # Sec. 4.1
        total = total + cfg.lambda_hyper * terms["hyper"]
    terms["loss"] = total
    return terms


@torch.no_grad()
def val_folders(cfg: Config) -> list[str]:
    """--val-images A,B: the held-out sets, each validated on its own (e.g. pictures that differ in
    everything, and concepts that differ only in their instance)."""
    return [f for f in (cfg.val_images or "").split(",") if f]


def validate(cfg: Config, comps, encoder, val: dict, step: int, out_dir: str) -> dict:
    """Is the encoder learning *concepts*? (a signal for any pre-training run)

    For each held-out image i the encoder predicts a concept (v_i, LoRA_i) from its centre view
    (the one forward tune.py makes). On held-out views of image i, Eq. (1) is measured with
    image i's own concept ("matched") and with image i+1's ("swapped"), with the same noise, t
    and prompts, so that the two differ only in the concept. An encoder that captures concepts
    denoises an image better with its own: gap = swapped - matched > 0. An encoder that learned
    one image-independent LoRA (a better denoiser, no concept) has gap ~ 0. Where the file names
    (or classes.csv) give the images at least two class nouns, the gap is also measured against
    the next image of another class and of the same class (class_split_gaps): a concept that is
    only its class has the first and not the second.
    Also: mean ||v*|| beside a word's (the median norm of the token table's words: where Eq. (4)
    holds v* far below it, the text encoder may not read v*'s direction as the word it points
    to), mean ||Delta W||_F (summed over layers), and a one-step reconstruction
    grid (input, then x0 predicted at t = 500 by its matched concept) written to OUT/val/
    (step_N.png for the first --val-images folder, step_N_<folder name>.png for the others).
    """
    device = comps.token_table.device
    encoder.eval()
    n = len(val["latents"])
    concepts = []
    t_enc = torch.full((1,), 500, device=device)
    for i in range(n):
        g = torch.Generator(device).manual_seed(i)
        z_t, _, _, _ = model.noisy_latents(comps.noise_scheduler, val["centre"][i:i + 1], g, t=t_enc)
        with model.autocast(device):
            v, lora = model.encode(encoder, comps, val["clip"][i:i + 1], z_t, t_enc)
        concepts.append((v.float(), {k: (A.float(), B.float()) for k, (A, B) in lora.items()}))
    cache = {}  # (i, j) -> loss: shared with class_split_gaps
    matched, swapped, gap = matched_vs_swapped(comps, concepts, [cfg.alpha_blend] * n, val, cache)
    dw = [sum(losses.hyperweight_l2(A, B) for A, B in lora.values()).sqrt().item() if lora else 0.0
          for _, lora in concepts]  # ||Delta W||_F over all layers
    rec = {"event": "val", "step": step, "images": val["folder"], "matched": sum(matched) / n,
           "swapped": sum(swapped) / n, "gap": gap["mean"], "gap_se": gap["se"],
           "v_norm": sum(v.norm().item() for v, _ in concepts) / n,
           "word_norm": val["word_norm"], "delta_w_norm": sum(dw) / n, "n": n,
           **class_split_gaps(comps, concepts, [cfg.alpha_blend] * n, val, cache),
           **collapse_stats(comps, torch.cat([v for v, _ in concepts]), val["files"])}
    tag = "" if val["folder"] == val_folders(cfg)[0] else "_" + os.path.basename(os.path.normpath(val["folder"]))
    _reconstruction_grid(cfg, comps, concepts, val, os.path.join(out_dir, "val", f"step_{step:07d}{tag}.png"))
    encoder.train()
    return rec


def collapse_stats(comps, v: torch.Tensor, files: list[str]) -> dict:
    """Has v* collapsed (Sec. 5.2's "mode collapse")? v (n, D): the held-out images' predictions.
    v_pairwise_cos: the mean cosine between the v* of two different images (1 = one v* for
    every image); top_words: the most common nearest words of the n v* with their counts;
    words: each image's three nearest words, by file name."""
    cos = model.mean_pairwise_cosine(v)
    near = model.nearest_words(comps.tokenizer, comps.token_table, v, k=3)
    top = Counter(words[0][0] for words in near).most_common(5)  # ties: in the order first met
    return {"v_pairwise_cos": round(cos, 4) if cos is not None else 0.0, "top_words": dict(top),
            "words": {f: [w for w, _ in words] for f, words in zip(files, near)}}


@torch.no_grad()
def concept_losses(comps, concepts: list, alphas: list[float], val: dict, partners: list,
                   cache: dict | None = None) -> list:
    """Eq. (1) on the held-out views of each image i with the concept of image partners[i] (None:
    skipped), with noise, t and prompts fixed by i alone, so that every partner of image i meets
    exactly the same noisy views. concepts: [(v (1, D), lora)], one per image; alphas: the
    alpha_blend of Eq. (5) each concept is used with. cache: {(i, j): loss} shared by the calls
    of one validation, so that a pair two measurements both use is computed once.
    Returns one loss (or None) per image."""
    device = comps.token_table.device
    cache = {} if cache is None else cache
    out = []
    for i, j in enumerate(partners):
        if j is None or (i, j) in cache:
            out.append(None if j is None else cache[i, j])
            continue
        z0 = val["latents"][i]  # (views, 4, h, w): held-out views of image i
        g = torch.Generator(device).manual_seed(10_000 + i)  # the same noise, t, prompts for every partner
        z_t, t, _, tgt = model.noisy_latents(comps.noise_scheduler, z0, g)
        prompts = data_lib.make_prompts(len(z0), random.Random(i))
        v, lora = concepts[j]
        pred = model.dual_path_prediction(comps, z_t, t, prompts, v, lora, alphas[j])
        cache[i, j] = losses.diffusion_loss(pred, tgt).item()
        out.append(cache[i, j])
    return out


def matched_vs_swapped(comps, concepts: list, alphas: list[float], val: dict, cache: dict | None = None):
    """Eq. (1) on the held-out views of each image i with concept i ("matched") and with concept
    i+1 ("swapped"), the same noise, t and prompts for both (concept_losses).
    Returns (matched losses, swapped losses, mean and SE of swapped - matched)."""
    n = len(concepts)
    matched = concept_losses(comps, concepts, alphas, val, list(range(n)), cache)
    swapped = concept_losses(comps, concepts, alphas, val, [(i + 1) % n for i in range(n)], cache)
    return matched, swapped, cmdline.mean_se([s - m for s, m in zip(swapped, matched)])


def class_partners(nouns: list[str]) -> dict:
    """For each image i (in file order), the next image (wrapping) whose class noun differs
    ("other_class") and the next with the same noun ("same_class"); None where there is none."""
    n = len(nouns)
    after = [[(i + k) % n for k in range(1, n)] for i in range(n)]
    return {kind: [next((j for j in after[i] if (nouns[j] == nouns[i]) == same), None) for i in range(n)]
            for kind, same in (("other_class", False), ("same_class", True))}


def class_split_gaps(comps, concepts: list, alphas: list[float], val: dict, cache: dict) -> dict:
    """The matched-vs-swapped gap split by class noun (data.class_nouns: classes.csv or the file
    names' leading words), when the images have at least two nouns: swapped for the next image of
    another class, and for the next image of the same class. An encoder that captures only the
    class (a "dog" concept, not *this* dog) has a clear other-class gap and none within a class;
    identity, Sec. 4's aim, needs both. cache: matched_vs_swapped's (the matched losses, and a
    partner that is also the next image, are not computed again). Keys gap_{kind}, gap_{kind}_se,
    n_{kind}; {} otherwise."""
    nouns = [val["nouns"][f] for f in val["files"]]
    if len(set(nouns)) < 2:
        return {}
    matched = concept_losses(comps, concepts, alphas, val, list(range(len(nouns))), cache)
    rec = {}
    partners_of = class_partners(nouns)
    for kind, partners in partners_of.items():
        swapped = concept_losses(comps, concepts, alphas, val, partners, cache)
        diffs = [s - m for s, m in zip(swapped, matched) if s is not None]
        if diffs:
            gap = cmdline.mean_se(diffs)
            rec.update({f"gap_{kind}": gap["mean"], f"gap_{kind}_se": gap["se"], f"n_{kind}": len(diffs)})
    if "gap_same_class" in rec and any(lora for _, lora in concepts):
        rec.update(same_class_part_gaps(comps, concepts, alphas, val, partners_of["same_class"], matched))
    return rec


def same_class_part_gaps(comps, concepts: list, alphas: list[float], val: dict, twins: list, matched: list) -> dict:
    """Where does a concept's instance live: in the word v* or in the weights Delta W? The
    same-class gap again, with only the twin's v* swapped in (image i keeps its own Delta W), and
    with only the twin's Delta W (i keeps its own v*). A v*-only gap near 0 beside a large Delta
    W-only gap says the encoder tells two instances of a class apart only through the hypernetwork;
    the test that matters is then whether that Delta W also changes what is drawn from noise (in
    the toy world it did not: its instance lowered Eq. (1) on the photo yet was not drawn).
    Keys gap_same_class_{v,dw}_only (+ _se)."""
    swaps = {"v": lambda own, twin: (twin[0], own[1]), "dw": lambda own, twin: (own[0], twin[1])}
    has_twin = [None if j is None else i for i, j in enumerate(twins)]  # image i meets its own mixed concept
    rec = {}
    for part, swap in swaps.items():
        mixed = [concepts[i] if j is None else swap(concepts[i], concepts[j]) for i, j in enumerate(twins)]
        swapped = concept_losses(comps, mixed, alphas, val, has_twin)
        gap = cmdline.mean_se([s - m for s, m in zip(swapped, matched) if s is not None])
        rec.update({f"gap_same_class_{part}_only": gap["mean"], f"gap_same_class_{part}_only_se": gap["se"]})
    return rec


def measure_concept_files(cfg: Config) -> dict:
    """--val-concepts DIR: the validation signal of saved concept files (DIR/<stem>.pt for each
    --val-images image), each with its own alpha_blend, instead of an encoder's predictions.
    Concepts known to carry identity (e.g. evaluate.py's textual_inversion ones) show how large a
    gap this signal gives when there is something to see. Prints and returns one JSON record."""
    device = cmdline.default_device()
    comps = model.load_components(cfg.preset, device=device, dtype=model.frozen_dtype(device), base=cfg.base,
                                  clip=cfg.clip, with_image_encoder=False)  # no encoder forward: no CLIP tower
    dualpath.install_dual_path(comps.unet)
    val = load_validation_set(cfg, comps)
    concepts, alphas = [], []
    for f in val["files"]:
        path = os.path.join(cfg.val_concepts, os.path.splitext(f)[0] + ".pt")
        try:
            c = model.load_concept(path)
        except (OSError, ValueError) as e:
            raise cmdline.UserError(f"--val-concepts: {e}") from None
        concepts.append((c["v_star"][None].to(device), model.concept_lora(c, device)))
        alphas.append(c["alpha_blend"])
    cache = {}  # (i, j) -> loss: shared with class_split_gaps
    matched, swapped, gap = matched_vs_swapped(comps, concepts, alphas, val, cache)
    n = len(concepts)
    rec = {"event": "val_concepts", "concepts": cfg.val_concepts, "images": cfg.val_images, "matched": sum(matched) / n,
           "swapped": sum(swapped) / n, "gap": gap["mean"], "gap_se": gap["se"], "n": n,
           **class_split_gaps(comps, concepts, alphas, val, cache)}
    print(json.dumps(rec))
    return rec


def _reconstruction_grid(cfg, comps, concepts, val, path: str):
    """Row 1: the held-out images; row 2: x0 predicted in one step at t = 500 with their concepts."""
    device = comps.token_table.device
    t = torch.full((1,), 500, device=device)
    tiles = []
    for i, (v, lora) in enumerate(concepts):
        g = torch.Generator(device).manual_seed(i)
        z0 = val["centre"][i:i + 1]
        z_t, _, _, _ = model.noisy_latents(comps.noise_scheduler, z0, g, t=t)
        pred = model.dual_path_prediction(comps, z_t, t, ["a photo of S*"], v, lora, cfg.alpha_blend).float()
        a = comps.noise_scheduler.alphas_cumprod.to(device)[500]
        x0 = (z_t - (1 - a).sqrt() * pred) / a.sqrt()  # DDPM: z_t = sqrt(a) z0 + sqrt(1 - a) eps
        for z in (z0, x0):
            img = comps.vae.decode((z / comps.vae.config.scaling_factor).to(next(comps.vae.parameters()).dtype)).sample
            tiles.append(((img[0].float().clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).cpu().numpy())
    r = tiles[0].shape[0]
    grid = Image.new("RGB", (r * len(concepts), 2 * r))
    for i in range(len(concepts)):
        grid.paste(Image.fromarray(tiles[2 * i]), (i * r, 0))
        grid.paste(Image.fromarray(tiles[2 * i + 1]), (i * r, r))
    cmdline.atomic_write(path, grid.save)  # (creates OUT/val/)


def load_validation_set(cfg: Config, comps, folder: str | None = None) -> dict:
    """Latents of the centre view and of `val_views` augmented views, and the CLIP view, of every
    image in one --val-images folder (default: the first; computed once), and a word's norm (the
    token table is frozen: the length validation shows beside ||v*||)."""
    folder = folder or val_folders(cfg)[0]
    files = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in data_lib.IMAGE_EXTS)
    if len(files) < 2:
        raise cmdline.UserError(f"--val-images: need at least 2 images in {folder}")
    device = comps.token_table.device
    res, clip_size = comps.cfg.resolution, comps.cfg.clip_size
    centre, clip, latents = [], [], []
    for k, f in enumerate(files):
        try:
            im = data_lib.load_image(os.path.join(folder, f))
        except data_lib.BadImage as e:
            raise cmdline.UserError(f"--val-images: {e}") from None
        vae_view, clip_view = data_lib.make_views(im, res, clip_size, rng=None)
        rng = random.Random(k)
        views = torch.stack([data_lib.make_views(im, res, clip_size, rng)[0] for _ in range(cfg.val_views)])
        g = torch.Generator(device).manual_seed(k)
        centre.append(model.vae_latents(comps.vae, vae_view[None].to(device), g).float())
        latents.append(model.vae_latents(comps.vae, views.to(device), g).float())
        clip.append(clip_view)
    return {"centre": torch.cat(centre), "clip": torch.stack(clip).to(device), "latents": latents, "files": files,
            "folder": folder, "nouns": data_lib.class_nouns(folder, files),
            "word_norm": model.typical_token_norm(comps.token_table)}


def make_checkpoint(cfg, comps, encoder, opt, sched, step: int) -> dict:
    """Trainable weights only (no frozen backbone), optimizer, scheduler, step, RNG, config."""
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return model.encoder_checkpoint(encoder, comps, step, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                    rng=rng, config=asdict(cfg))


def save_checkpoint(cfg: Config, comps, encoder, opt, sched, step: int, periodic: bool = False):
    """OUT/encoder.pt (what tune.py and --resume read) and, if periodic, OUT/encoder_{step}.pt."""
    ckpt = make_checkpoint(cfg, comps, encoder, opt, sched, step)
    cmdline.atomic_save(ckpt, os.path.join(cfg.out, "encoder.pt"))
    if periodic:
        cmdline.atomic_save(ckpt, os.path.join(cfg.out, f"encoder_{step:07d}.pt"))


def check_resumable(path: str, comps, encoder, opt) -> dict:
    """Load a checkpoint for --resume and check all of it against this run before touching
    anything: the encoder's tensors (names, shapes, finite values), the optimiser's state (one
    moment per parameter, of its shape), the scheduler and the RNG states. Raises ValueError
    naming the file and what is wrong."""
    ckpt = model.load_encoder_checkpoint(path)
    if ckpt["preset"] != comps.preset:
        raise ValueError(f"{path} is for preset {ckpt['preset']!r}, not {comps.preset!r}")
    if list(ckpt["layer_names"]) != list(encoder.layer_names) or ckpt.get("hypernet", True) != encoder.hypernet:
        raise ValueError(f"{path}: its LoRA layers or hypernetwork setting are not this run's")
    model.check_encoder_state(ckpt["encoder"], encoder.state_dict(), path)
    o, want = ckpt.get("optimizer"), opt.state_dict()
    if not (isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)
            and [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in o["param_groups"]]
            == [len(g["params"]) for g in want["param_groups"]]):
        raise ValueError(f"{path}: optimizer must be the state of this run's AdamW "
                         f"({sum(len(g['params']) for g in want['param_groups'])} parameters)")
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, s in o["state"].items():
        if not (_is_index(i, len(params)) and isinstance(s, dict)):
            raise ValueError(f"{path}: optimizer state {i!r} is not one of this run's {len(params)} parameters")
        for k, t in s.items():
            if k == "step":
                continue
            model.check_tensor(t, path, f"optimizer state[{i}][{k!r}]")
            if t.shape != params[i].shape:
                raise ValueError(f"{path}: optimizer state[{i}][{k!r}] has shape {tuple(t.shape)}, "
                                 f"its parameter {tuple(params[i].shape)}")
    if not isinstance(ckpt.get("scheduler"), dict):
        raise ValueError(f"{path}: scheduler must be the LR schedule's state (a dict)")
    rng = ckpt.get("rng")
    torch_state = torch.get_rng_state()
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
            and rng["torch"].dtype == torch_state.dtype and rng["torch"].shape == torch_state.shape):
        raise ValueError(f"{path}: rng['torch'] must be a torch RNG state ({tuple(torch_state.shape)} bytes)")
    py = rng.get("python")
    if not (isinstance(py, list) and len(py) == 625 and all(model._is_int(x) and 0 <= x < 2 ** 32 for x in py)):
        raise ValueError(f"{path}: rng['python'] must be Python's Mersenne Twister state (625 ints)")
    return ckpt


def _is_index(i, n: int) -> bool:
    return model._is_int(i) and 0 <= i < n


def resume_from_checkpoint(cfg: Config, comps, encoder, opt, sched, device, master: bool) -> int:
    """Restore weights, optimiser, schedule and RNG from --resume (or OUT/encoder.pt for "auto").
    Returns the step to continue from (0 when there is nothing to resume). A damaged checkpoint
    is a one-line error; with --resume auto, the newest good periodic OUT/encoder_STEP.pt is
    used instead, with a warning (the run then repeats the steps after it)."""
    path = os.path.join(cfg.out, "encoder.pt") if cfg.resume == "auto" else cfg.resume
    if not (path and os.path.exists(path)):
        return 0
    try:
        ckpt = check_resumable(path, comps, encoder, opt)
    except ValueError as e:
        if cfg.resume != "auto":
            raise cmdline.UserError(f"--resume: {e}") from None
        ckpt, path = None, f"{path} ({e})"
        for older in sorted(glob.glob(os.path.join(cfg.out, "encoder_*.pt")), reverse=True):
            try:
                ckpt = check_resumable(older, comps, encoder, opt)
            except ValueError:
                continue
            if master:
                print(f"pretrain.py: warning: {path}: resuming from {older}, the newest good checkpoint",
                      file=sys.stderr)
            path = older
            break
        if ckpt is None:
            raise cmdline.UserError(f"--resume auto: {e}; no good encoder_STEP.pt beside it either "
                                    f"(delete {os.path.join(cfg.out, 'encoder.pt')} to start afresh)") from None
    encoder.load_state_dict(ckpt["encoder"])
    try:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # what the checks above cannot see
        raise cmdline.UserError(f"--resume: {path}: its optimizer or scheduler state does not fit this run "
                                f"({e.__class__.__name__})") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate((3, tuple(ckpt["rng"]["python"]), None))  # (version 3, Mersenne state, no gauss)
    if isinstance(ckpt["rng"].get("cuda"), torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    if master:
        print(f"resumed from {path} at step {ckpt['step']}", file=sys.stderr)
    return ckpt["step"]


def open_dataset(cfg: Config, comps, world: int):
    """The training images and the number of whole global batches in one pass over them."""
    try:
        dataset = data_lib.ConceptImages(cfg.data, cfg.openimages, comps.cfg.resolution, comps.cfg.clip_size,
                                         augment=True, synthetic_seed=cfg.seed)
    except FileNotFoundError as e:
        raise cmdline.UserError(str(e)) from None
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise cmdline.UserError(f"{len(dataset)} images are fewer than one global batch ({cfg.batch_size} x {world})")
    return dataset, steps_per_epoch


def shard_loader(cfg: Config, dataset, device, world: int, rank: int, epoch: int, skip_batches: int):
    """This rank's shard of one epoch, minus the batches a resumed run already saw."""
    sampler = data_lib.ResumableSampler(len(dataset), world, rank, cfg.seed, epoch, skip_batches * cfg.batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                       num_workers=cfg.num_workers, pin_memory=device.type == "cuda")


class RunLog:
    """What a run reports: the progress bar, stderr lines and OUT/log.jsonl (rank 0 only), the
    throughput, and the unreadable files of each epoch (from every rank)."""

    def __init__(self, cfg: Config, device, step: int, last: int, master: bool, world: int):
        self.cfg, self.device, self.master, self.world = cfg, device, master, world
        self.path = os.path.join(cfg.out, "log.jsonl")
        self.bar = tqdm(total=last, initial=step, disable=not master, desc="pretrain", dynamic_ncols=True)
        self.t_log, self.images_since, self.images_per_s = time.time(), 0, 0.0
        self.bad_images = set()  # names of the unreadable files seen this epoch, on this rank
        self.validated_step = None

    def write(self, record: dict):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def after_step(self, step: int, last: int, terms: dict, lr: float, batch):
        self.bad_images.update(p for b in batch["bad"] for p in b.splitlines())
        self.images_since += self.cfg.batch_size * self.world
        self.bar.update(1)
        if step % self.cfg.log_every and step != last:
            return
        if self.device.type == "cuda":  # (.item() waits for the GPU: only on log steps)
            torch.cuda.synchronize()
        self.images_per_s = self.images_since / max(1e-9, time.time() - self.t_log)
        self.t_log, self.images_since = time.time(), 0
        if self.master:
            peak = cmdline.peak_memory_gb(self.device)
            self.bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()})
            self.bar.write(f"step {step}: loss {terms['loss'].item():.4f}, {self.images_per_s:.1f} images/s, "
                           f"peak {peak:.2f} GB", file=sys.stderr)
            self.write({"step": step, **{k: round(v.item(), 6) for k, v in terms.items()}, "lr": lr,
                        "images_per_s": round(self.images_per_s, 3), "peak_gb": round(peak, 3)})

    def validation(self, rec: dict):
        gap = lambda kind: f"{rec[f'gap_{kind}']:+.5f} ± {rec[f'gap_{kind}_se']:.5f}"
        split = "".join(f"{kind.replace('_', ' ')} {gap(kind)}, " for kind in ("other_class", "same_class")
                        if f"gap_{kind}" in rec)
        if "gap_same_class_v_only" in rec:  # same_class_part_gaps: the twin's v* alone, its dW alone
            split += f"(twin's v* only {gap('same_class_v_only')}, dW only {gap('same_class_dw_only')}), "
        self.bar.write(f"step {rec['step']}: val [{rec['images']}] gap (swapped - matched) "
                       f"{rec['gap']:+.5f} ± {rec['gap_se']:.5f}, {split}"
                       f"matched {rec['matched']:.5f}, |v*| {rec['v_norm']:.3f} (a word's: {rec['word_norm']:.3f}), "
                       f"|dW| {rec['delta_w_norm']:.3f}, "
                       f"v* pairwise cos {rec['v_pairwise_cos']:.3f}, nearest words "
                       + ", ".join(f"{w} x{c}" for w, c in rec["top_words"].items()), file=sys.stderr)
        self.write(rec)
        self.validated_step = rec["step"]

    def epoch_end(self, epoch: int, step: int):
        """Name the distinct unreadable files of the epoch (all ranks), on stderr and in the log."""
        names = [self.bad_images]
        if self.world > 1:
            names = [None] * self.world
            dist.all_gather_object(names, self.bad_images)
        names = sorted(set().union(*names))
        if self.master and names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self.bar.write(f"epoch {epoch}: skipped {len(names)} unreadable image(s): {shown}", file=sys.stderr)
        self.write({"event": "epoch_end", "epoch": epoch, "step": step, "bad_images": len(names), "bad_files": names})
        self.bad_images = set()


def main(cfg: Config):
    # 1) Processes and devices (same file under `python` and `torchrun`, like nanoGPT).
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        encoder = train(cfg, device, rank, world)
        if ddp:  # every rank is done (rank 0 writes the log last) before any rank tears down
            dist.barrier()
        return encoder
    finally:
        if ddp:
            dist.destroy_process_group()


def build_training(cfg: Config, device, master: bool):
    """(frozen components with the dual-path processors, trainable encoder, AdamW, LR schedule)."""
    comps = model.load_components(cfg.preset, device=device, dtype=model.frozen_dtype(device), base=cfg.base,
                                  clip=cfg.clip)
    names = dualpath.install_dual_path(comps.unet)
    if cfg.grad_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    torch.manual_seed(cfg.seed)  # the encoder's initial weights
    encoder = model.build_encoder(comps, names, hypernet=cfg.hypernet).to(device)
    if master:
        print(f"tuning-encoder ({cfg.preset}): {model.count_parameters(encoder):,} trainable parameters; "
              f"{len(names)} LoRA layers, rank {comps.cfg.lora_rank}", file=sys.stderr)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return comps, encoder, opt, sched


def train(cfg: Config, device, rank: int, world: int):
    """One process's whole run, phase by phase (every rank runs the same code)."""
    master = rank == 0

    # 2) Frozen parts, the trainable encoder (fp32), AdamW and the LR schedule.
    comps, encoder, opt, sched = build_training(cfg, device, master)

    # 3) Resume (weights, optimiser, schedule, RNG), then wrap in DDP, which averages the
    #    gradients of all ranks during backward().
    step = resume_from_checkpoint(cfg, comps, encoder, opt, sched, device, master)
    ddp_encoder = DDP(encoder, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else encoder

    # 4) Data: every rank reads its own shard; held-out images for the validation signal (rank 0).
    dataset, steps_per_epoch = open_dataset(cfg, comps, world)
    vals = [load_validation_set(cfg, comps, f) for f in val_folders(cfg)] if master else []
    if master:
        os.makedirs(cfg.out, exist_ok=True)
    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    log = RunLog(cfg, device, step, last, master, world)
    encoder.train()

    # 5) The training loop.
    epoch = step // steps_per_epoch
    try:
        while step < last:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            for batch in shard_loader(cfg, dataset, device, world, rank, epoch, done_in_epoch):
                terms = pretrain_losses(cfg, comps, ddp_encoder, batch, step_seed(cfg, step, rank), world, rank, step)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()  # (under DDP: all-reduce of the gradients)
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                log.after_step(step, last, terms, sched.get_last_lr()[0], batch)
                if step % cfg.val_every == 0 or step == last:
                    for val in vals:
                        log.validation(validate(cfg, comps, encoder, val, step, cfg.out))
                if master and step % cfg.save_every == 0:
                    save_checkpoint(cfg, comps, encoder, opt, sched, step, periodic=True)
                if step >= last:
                    break
            else:  # a full epoch ended
                log.epoch_end(epoch, step)
        if master:
            save_checkpoint(cfg, comps, encoder, opt, sched, step)
    except KeyboardInterrupt:
        if master:
            print(f"\ninterrupted: saving step {step} to {cfg.out}/encoder.pt", file=sys.stderr)
            save_checkpoint(cfg, comps, encoder, opt, sched, step)
        raise SystemExit(130)
    finally:
        log.bar.close()
    log.epoch_end(epoch, step)
    if log.validated_step != step:  # e.g. --resume of a finished run: validate it
        for val in vals:
            log.validation(validate(cfg, comps, encoder, val, step, cfg.out))
    if master:
        print(f"pretrain.py: wrote {os.path.join(cfg.out, 'encoder.pt')} (step {step}; tune.py --encoder reads it) "
              f"and {log.path}", file=sys.stderr)

    # 6) Check that the ranks hold the same weights, and report.
    report_end(cfg, device, encoder, step, world, master, log)
    return encoder


def report_end(cfg: Config, device, encoder, step: int, world: int, master: bool, log: RunLog):
    """Every rank's parameter checksums (equal under DDP) in the log; --benchmark's JSON line."""
    checksum = torch.stack([sum(p.detach().double().sum() for p in encoder.parameters()),
                            sum(p.detach().double().pow(2).sum() for p in encoder.parameters())]).to(device)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    if world > 1:
        dist.all_gather(sums, checksum)
    else:
        sums = [checksum]
    log.write({"event": "done", "step": step, "world_size": world, "param_checksums": [s.tolist() for s in sums]})
    if master and cfg.benchmark:
        print(json.dumps({"what": "pretrain", "preset": cfg.preset, "device": cmdline.device_name(device),
                          "world_size": world, "batch_size": cfg.batch_size, "steps": step,
                          "images_per_s": round(log.images_per_s, 3),
                          "peak_gb": round(cmdline.peak_memory_gb(device), 3),
                          "encoder_params": model.count_parameters(encoder)}))


def cli(argv=None) -> int:
    def checked_main(cfg):
        if cfg.val_concepts is not None:  # no training: calibrate the validation signal
            if len(val_folders(cfg)) != 1 or not all(os.path.isdir(d) for d in (cfg.val_images, cfg.val_concepts)):
                raise cmdline.UserError("--val-concepts DIR needs --val-images DIR (one), both existing folders")
            return measure_concept_files(cfg)
        check_config(cfg)
        return main(cfg)

    return cmdline.run_cli("pretrain.py", checked_main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
