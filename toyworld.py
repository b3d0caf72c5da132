"""
toyworld.py -- a miniature world in which the whole paper can be trained and measured on a CPU.

The real Stable Diffusion and CLIP weights are gigabytes, and the paper's pre-training takes
150k GPU steps; with random weights "identity" and "prompt alignment" mean nothing. This file
builds a world small enough to learn on a laptop, and base models trained on it, saved in their
own ecosystems' formats so that `--preset toy` loads them through exactly the code that loads
SD 1.5 (`--base DIR`, `--clip DIR`):

  the world   32 x 32 pictures of one object. Its CLASS is named by captions ("a star"); its
              INSTANCE details are never named by the text-to-image captions (a seeded pattern
              -- striped, dotted or checked -- in two colours: one particular star, as one
              particular dog); its CONTEXT is named (background colour, small or large). Concepts
              used for evaluation are instances no training stage has seen.
  the models  a latent text-to-image model: AutoencoderKL + CLIPTextModel (SD 1.5's tokenizer
              and vocabulary) + UNet2DConditionModel with cross-attention, saved with
              save_pretrained as a diffusers Stable Diffusion folder (OUT/sd); and two CLIPs
              trained contrastively on the world, saved as open_clip folders: OUT/clip-h (the
              encoder's image backbone, ViT-H-14's part) and OUT/clip-b (the metric, ViT-B-16's
              part; another seed and width, so the encoder is never scored by its own backbone).
              The CLIPs' captions *do* name the instance details, as real CLIP captions often
              do, so that CLIP-I can tell instances apart.

    python toyworld.py --out runs/toyworld                 # every stage; a re-run reuses finished ones
    python toyworld.py --out runs/toyworld --stage competence
    # then the paper, with the ordinary scripts (README, "The paper in miniature"):
    python pretrain.py --preset toy --data runs/toyworld/train --out runs/toy-date ...

Stages (each cached; the long ones checkpoint and resume): world (rendered training set, the
unseen evaluation concepts, held-out pictures for the validation signal), vae, clip-h, clip-b,
t2i (text encoder + UNet), competence.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

# diffusers, transformers, open_clip and matplotlib are imported inside the functions that use them:
# importing them takes 5-10 s, and --help and one-line input errors should answer at once.
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm import tqdm

import cmdline
import data as data_lib
import evaluate
import model
import sample

# ----------------------------------------------------------------------------------------
# The world

SIZE = 32  # pixels
CLASSES = ("ring", "star", "square", "triangle", "cross", "heart")  # named by every caption
BACKGROUNDS = {"red": (205, 45, 45), "green": (45, 160, 70), "blue": (45, 80, 210), "yellow": (235, 215, 50),
               "white": (240, 240, 240)}  # context, named
SIZES = {"small": (0.13, 0.16), "large": (0.25, 0.29)}  # context, named: the object's radius / picture size
PATTERNS = ("striped", "dotted", "checked")  # instance detail, never named by the text-to-image captions
COLOURS = {"orange": (250, 140, 20), "purple": (120, 40, 150), "pink": (250, 150, 190), "brown": (120, 70, 30),
           "grey": (128, 128, 128), "black": (20, 20, 20), "navy": (20, 30, 90)}  # instance detail
TRAIN_INSTANCES_PER_CLASS = 150
EVAL_SEED0 = 1_000_000  # evaluation instances come from seeds no training stage draws
N_CONCEPTS = 12  # unseen instances photographed once each, for tune.py / evaluate.py
N_HELDOUT = 24  # further unseen instances, in random contexts, for the validation signal
HELDOUT_SEED = 12_345


@dataclass(frozen=True)
class Instance:
    """One particular object: its class, and details no text-to-image caption names."""

    cls: str
    pattern: str
    colour1: str
    colour2: str
    period: float  # pattern scale, a fraction of the object's size (named nowhere)
    angle: float  # pattern orientation in degrees (named nowhere)

    def details(self) -> str:
        """The instance described in words (the CLIPs' captions only)."""
        return f"{self.pattern} {self.colour1} and {self.colour2} {self.cls}"


def make_instance(seed: int) -> Instance:
    rng = random.Random(seed)
    c1, c2 = rng.sample(sorted(COLOURS), 2)
    return Instance(CLASSES[seed % len(CLASSES)], rng.choice(PATTERNS), c1, c2, rng.uniform(0.18, 0.3),
                    rng.choice((0.0, 45.0, 90.0, 135.0)))


def eval_instances(n: int) -> list[Instance]:
    """n unseen instances, cycling through the classes, none equal in every detail to a training one."""
    train = {(i.cls, i.pattern, i.colour1, i.colour2) for i in train_instances()}
    out, seed = [], EVAL_SEED0
    while len(out) < n:
        inst = make_instance(seed)
        seed += 1
        unseen = (inst.cls, inst.pattern, inst.colour1, inst.colour2) not in train
        if inst.cls == CLASSES[len(out) % len(CLASSES)] and unseen:
            out.append(inst)
    return out


def train_instances() -> list[Instance]:
    return [make_instance(s) for s in range(TRAIN_INSTANCES_PER_CLASS * len(CLASSES))]


def _shape_mask(cls: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if cls == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r], fill=0)
    elif cls == "square":
        d.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=255)
    elif cls == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=255)
    elif cls == "star":
        d.polygon([(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(math.pi * k / 5 - math.pi / 2),
                    cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)],
                  fill=255)
    elif cls == "cross":
        w = 0.36 * r
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:  # heart: two discs and a triangle
        d.ellipse([cx - r, cy - 0.75 * r, cx, cy + 0.2 * r], fill=255)
        d.ellipse([cx, cy - 0.75 * r, cx + r, cy + 0.2 * r], fill=255)
        d.polygon([(cx - 0.97 * r, cy - 0.15 * r), (cx + 0.97 * r, cy - 0.15 * r), (cx, cy + r)], fill=255)
    return mask


def _pattern(inst: Instance, size: int) -> Image.Image:
    """The instance's fill: its pattern in its two colours, at its scale and angle (the same
    whatever the object's size, as a real object's texture)."""
    big = int(size * 1.5)
    im = Image.new("RGB", (big, big), COLOURS[inst.colour1])
    d = ImageDraw.Draw(im)
    p = max(4.0, inst.period * 0.5 * size)
    c2 = COLOURS[inst.colour2]
    n = int(big / p) + 2
    for i in range(n):
        for j in range(n):
            x, y = i * p, j * p
            if inst.pattern == "striped" and j == 0:
                d.rectangle([x, 0, x + p / 2, big], fill=c2)
            elif inst.pattern == "dotted":
                d.ellipse([x + p * 0.2, y + p * 0.2, x + p * 0.75, y + p * 0.75], fill=c2)
            elif inst.pattern == "checked" and (i + j) % 2 == 0:
                d.rectangle([x, y, x + p, y + p], fill=c2)
    im = im.rotate(inst.angle, resample=Image.BILINEAR)
    o = (big - size) // 2
    return im.crop((o, o, o + size, o + size))


def render(inst: Instance, background: str, obj_size: str, rng: random.Random | None = None,
           size: int = SIZE) -> Image.Image:
    """One picture: the instance, small or large, on a background; where it sits (never named)
    and the exact size come from rng."""
    s = 4 * size  # drawn at 4x, then downsampled (anti-aliasing)
    rng = rng or random.Random(0)
    r = s * rng.uniform(*SIZES[obj_size])
    cx, cy = (rng.uniform(r + 0.04 * s, s - r - 0.04 * s) for _ in range(2))
    im = Image.new("RGB", (s, s), BACKGROUNDS[background])
    im.paste(_pattern(inst, s), (0, 0), _shape_mask(inst.cls, cx, cy, r, s))
    return im.resize((size, size), Image.LANCZOS)


TEMPLATES = data_lib.PROMPT_TEMPLATES  # the same prefixes DATE's prompts use ("a photo of {}", ...)


def t2i_caption(cls: str, background: str | None, obj_size: str | None, template: str = "a photo of {}") -> str:
    """A text-to-image caption: class and context, never the instance's details.
    ("a photo of a small star on a red background"; either context may be left out.)"""
    text = template.format(f"a {obj_size} {cls}" if obj_size else f"a {cls}")
    if background is not None:
        text += f" on a {background} background"
    return text


# ----------------------------------------------------------------------------------------
# Stage "world": a rendered training set, the unseen evaluation concepts, held-out pictures


def sample_scene(rng: random.Random, instances: list[Instance]):
    inst = rng.choice(instances)
    return inst, rng.choice(sorted(BACKGROUNDS)), rng.choice(list(SIZES))


def stage_world(out: str, n_train: int, seed: int):
    """OUT/world.pt (uint8 images + scene records, for the base models), OUT/train/ (PNG folder
    for DATE pre-training), OUT/concepts/ (one photo per unseen instance, for tune/evaluate),
    OUT/heldout/ (further unseen instances in random contexts, for pretrain.py --val-images),
    OUT/second-photos/ (another photo of each concept)."""
    rng = random.Random(seed)
    insts = train_instances()
    images, scenes = torch.empty((n_train, 3, SIZE, SIZE), dtype=torch.uint8), []
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    for i in tqdm(range(n_train), desc="world", dynamic_ncols=True):
        inst, bg, obj_size = sample_scene(rng, insts)
        im = render(inst, bg, obj_size, rng)
        images[i] = _u8(im)
        scenes.append({"instance": insts.index(inst), "background": bg, "size": obj_size})
        if i < 4000:  # DATE pre-training reads a plain image folder, as it would read ImageNet
            im.save(os.path.join(out, "train", f"{i:05d}.png"))
    cdir = os.path.join(out, "concepts")
    os.makedirs(cdir, exist_ok=True)
    for k, inst in enumerate(eval_instances(N_CONCEPTS)):
        # The one photo of each concept: large, on white (no coloured background to copy).
        render(inst, "white", "large", random.Random(k)).save(os.path.join(cdir, f"{inst.cls}_{k:02d}.png"))
    write_heldout(out)
    write_second_photos(out)
    cmdline.atomic_save({"images": images, "scenes": scenes}, os.path.join(out, "world.pt"))


def write_heldout(out: str, n: int = N_HELDOUT):
    """OUT/heldout/: pictures of n further unseen instances, each in a random context, for
    pretrain.py --val-images. The 12 concepts share one context (large, on white), so their
    matched-vs-swapped gap sees only class and instance; these pictures also differ in what a
    picture shows in the large (background, size), which an encoder learns first. Together the two
    sets tell apart three regimes: one image-independent LoRA (gap ~0 on both), concepts at the
    level of context (positive here only), and concepts at the level of the instance (both)."""
    hdir = os.path.join(out, "heldout")
    os.makedirs(hdir, exist_ok=True)
    rng = random.Random(HELDOUT_SEED)
    for k, inst in enumerate(eval_instances(N_CONCEPTS + n)[N_CONCEPTS:]):  # none of them a concept
        bg, obj_size = rng.choice(sorted(BACKGROUNDS)), rng.choice(list(SIZES))
        render(inst, bg, obj_size, rng).save(os.path.join(hdir, f"{k:02d}_{inst.cls}_{bg}_{obj_size}.png"))


def write_second_photos(out: str):
    """OUT/second-photos/: each concept's instance photographed again, large on white, at another
    place and size, under the concept's file name. A concept tuned on the first photo that scores
    a positive gap here (pretrain.py --val-images OUT/second-photos --val-concepts DIR) carries the
    instance, not the photo."""
    sdir = os.path.join(out, "second-photos")
    os.makedirs(sdir, exist_ok=True)
    for k, inst in enumerate(eval_instances(N_CONCEPTS)):
        render(inst, "white", "large", random.Random(k + 500)).save(os.path.join(sdir, f"{inst.cls}_{k:02d}.png"))


def _u8(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W)."""
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3).permute(2, 0, 1)


def load_world(out: str):
    w = torch.load(os.path.join(out, "world.pt"), weights_only=True)
    return w["images"], w["scenes"], train_instances()


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1  # [-1, 1]


# ----------------------------------------------------------------------------------------
# Training helpers: seeded, checkpointed, resumable


def train_loop(name: str, out: str, params, step_fn, steps: int, lr: float, state: dict, ckpt_every: int = 250):
    """AdamW with a short warm-up and cosine decay; checkpoints `state` (modules) to
    OUT/NAME.ckpt every ckpt_every steps and resumes from it."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    path = os.path.join(out, f"{name}.ckpt")
    step = 0
    if os.path.isfile(path):
        ck = torch.load(path, weights_only=True)
        for k, m in state.items():
            m.load_state_dict(ck["state"][k])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step = ck["step"]
    bar = tqdm(total=steps, initial=step, desc=name, dynamic_ncols=True)
    while step < steps:
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % ckpt_every == 0 or step == steps:
            cmdline.atomic_save({"state": {k: m.state_dict() for k, m in state.items()}, "opt": opt.state_dict(),
                               "sched": sched.state_dict(), "step": step}, path)
    bar.close()


# ----------------------------------------------------------------------------------------
# Stage "vae": an AutoencoderKL that halves the resolution (32 x 32 x 3 -> 16 x 16 x 4)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
                         sample_size=SIZE, mid_block_add_attention=False)


def stage_vae(out: str, steps: int, batch: int, seed: int):
    images, _, _ = load_world(out)
    torch.manual_seed(seed)
    vae = build_vae()

    def step_fn(step):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        x = to_unit(images[torch.randint(0, len(images), (batch,), generator=g)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        return F.mse_loss(rec, x) + 1e-4 * kl  # reconstruction, and a small KL as in SD's VAE

    train_loop("vae", out, list(vae.parameters()), step_fn, steps, 1e-3, {"vae": vae})
    # SD's convention: latents are scaled to unit variance (SD 1.5: 0.18215).
    with torch.no_grad():
        z = vae.encode(to_unit(images[:512])).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(os.path.join(out, "sd", "vae"))


# ----------------------------------------------------------------------------------------
# Stages "clip-h" and "clip-b": two CLIPs trained contrastively on captions naming the details


CLIP_CONFIGS = {
    # The encoder's image backbone (plays ViT-H-14): nn.GELU like the LAION weights.
    "clip-h": {"embed_dim": 64, "quick_gelu": False,
               "vision_cfg": {"image_size": SIZE, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
    # The metric (plays ViT-B-16): another width and seed; QuickGELU like the OpenAI weights.
    "clip-b": {"embed_dim": 64, "quick_gelu": True,
               "vision_cfg": {"image_size": SIZE, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
}


def clip_caption(inst: Instance, bg: str, obj_size: str, rng: random.Random) -> str:
    """A CLIP caption: the class always; the details, background and size each most of the time."""
    what = inst.details() if rng.random() < 0.7 else inst.cls
    return t2i_caption(what, bg if rng.random() < 0.8 else None, obj_size if rng.random() < 0.8 else None,
                       rng.choice(TEMPLATES))


def clip_images(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> the CLIP input, normalised with the CLIP mean/std like open_clip."""
    x = images_u8.float() / 255
    return (x - torch.tensor(model.CLIP_MEAN)[:, None, None]) / torch.tensor(model.CLIP_STD)[:, None, None]


def stage_clip(name: str, out: str, steps: int, batch: int, seed: int):
    import open_clip

    images, scenes, insts = load_world(out)
    cfg = CLIP_CONFIGS[name]
    torch.manual_seed(seed)
    clip = open_clip.CLIP(**cfg)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")

    def step_fn(step):
        rng = random.Random(seed * 100_003 + step)
        idx = [rng.randrange(len(images)) for _ in range(batch)]
        texts = [clip_caption(insts[scenes[i]["instance"]], scenes[i]["background"], scenes[i]["size"], rng)
                 for i in idx]
        pixels = images[idx]
        img = F.normalize(clip.encode_image(clip_images(pixels)), dim=-1)
        txt = F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
        logits = clip.logit_scale.exp() * img @ txt.T
        # Identical captions in a batch are not negatives of each other.
        same = torch.tensor([[a == b for b in texts] for a in texts])
        target = same.float() / same.sum(1, keepdim=True)
        return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target.T * logits.T.log_softmax(1), 1).mean())

    train_loop(name, out, list(clip.parameters()), step_fn, steps, 1e-3, {"clip": clip})
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": list(model.CLIP_MEAN), "std": list(model.CLIP_STD)}},
                  f, indent=2)
    weights = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(weights, os.path.join(folder, "open_clip_model.safetensors"))


# ----------------------------------------------------------------------------------------
# Stage "t2i": text encoder + UNet, trained together on the VAE's latents


def build_t2i():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(model._text_config(width=64, mlp=256, layers=3, heads=4))
    # Attention (self and cross) at 8 x 8 only: on a CPU, attention over the 16 x 16 map costs
    # more than all the convolutions together. 4 transformer blocks -> 24 LoRA'd projections.
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=64, attention_head_dim=4,
    )
    return text_encoder, unet


def stage_t2i(out: str, steps: int, batch: int, seed: int):
    from diffusers import AutoencoderKL, DDPMScheduler

    images, scenes, insts = load_world(out)
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "sd", "vae")).eval().requires_grad_(False)
    latents_path = os.path.join(out, "latents.pt")
    if not os.path.isfile(latents_path):  # the VAE is frozen: encode the world once
        with torch.no_grad():
            mu, sd = [], []
            for i in tqdm(range(0, len(images), 256), desc="latents", dynamic_ncols=True):
                d = vae.encode(to_unit(images[i:i + 256])).latent_dist
                mu.append(d.mean)
                sd.append(d.std)
        cmdline.atomic_save({"mean": torch.cat(mu), "std": torch.cat(sd)}, latents_path)
    lat = torch.load(latents_path, weights_only=True)
    scale = vae.config.scaling_factor
    tokenizer = model.build_tokenizer()
    scheduler = DDPMScheduler(**model.sd15_scheduler_config())
    torch.manual_seed(seed)
    text_encoder, unet = build_t2i()

    def step_fn(step):
        rng = random.Random(seed * 100_003 + step)
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        idx = [rng.randrange(len(images)) for _ in range(batch)]
        z0 = (lat["mean"][idx] + lat["std"][idx] * torch.randn(lat["mean"][idx].shape, generator=g)) * scale
        captions = []
        for i in idx:
            s = scenes[i]
            r = rng.random()
            if r < 0.1:
                captions.append("")  # unconditional, for classifier-free guidance
            else:  # context named most of the time; every DATE prompt template as a prefix
                captions.append(t2i_caption(insts[s["instance"]].cls, s["background"] if rng.random() < 0.85 else None,
                                            s["size"] if rng.random() < 0.85 else None, rng.choice(TEMPLATES)))
        ids = tokenizer(captions, padding="max_length", max_length=model.MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        z_t, t, _, target = model.noisy_latents(scheduler, z0, g)
        pred = unet(z_t, t, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        return F.mse_loss(pred, target)

    train_loop("t2i", out, list(text_encoder.parameters()) + list(unet.parameters()), step_fn, steps, 5e-4,
               {"text_encoder": text_encoder, "unet": unet})
    sd = os.path.join(out, "sd")
    unet.save_pretrained(os.path.join(sd, "unet"))
    text_encoder.save_pretrained(os.path.join(sd, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(sd, "tokenizer"))
    scheduler.save_pretrained(os.path.join(sd, "scheduler"))
    with open(os.path.join(sd, "model_index.json"), "w") as f:  # what StableDiffusionPipeline.from_pretrained reads
        json.dump({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f, indent=2)


# ----------------------------------------------------------------------------------------
# Stage "competence": does the base model follow prompts; can the metric tell instances apart?


def competence(out: str, n_prompts: int = 60, steps: int = 25, seed: int = 0, device="cpu") -> dict:
    """Prompt following of the toy text-to-image model and instance separation of the metric
    CLIP, measured with the code the evaluation uses (sample.generate, evaluate.ClipMetric)."""

    comps = model.load_components("toy", device=device, base=os.path.join(out, "sd"), clip=os.path.join(out, "clip-h"),
                                  with_image_encoder=False)
    pipe = sample.build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    metric = evaluate.ClipMetric("toy", device, os.path.join(out, "clip-b"))
    rng = random.Random(seed)

    # 1) Prompt following: generate from a prompt naming a class and a context, then let the
    #    metric CLIP pick the context among the captions that differ in that factor alone.
    correct = {"background": [], "size": []}
    for k in tqdm(range(n_prompts), desc="competence", dynamic_ncols=True):
        cls, bg, obj_size = rng.choice(CLASSES), rng.choice(sorted(BACKGROUNDS)), rng.choice(list(SIZES))
        img = sample.generate(pipe, comps, None, t2i_caption(cls, bg, obj_size), num_images=1, steps=steps,
                              seed=seed + k)[0]
        feats = metric.image_features([img])
        for factor, options, truth in (("background", sorted(BACKGROUNDS), bg), ("size", list(SIZES), obj_size)):
            texts = [t2i_caption(cls, o, obj_size) if factor == "background" else t2i_caption(cls, bg, o)
                     for o in options]
            pick = options[int((feats @ metric.text_features(texts).T).argmax())]
            correct[factor].append(float(pick == truth))

    # 2) Identity: the same instance in two contexts vs two instances of one class.
    insts = eval_instances(24)
    same, other = [], []
    for k, inst in enumerate(insts):
        r = random.Random(k)
        a = render(inst, r.choice(sorted(BACKGROUNDS)), r.choice(list(SIZES)), r)
        b = render(inst, r.choice(sorted(BACKGROUNDS)), r.choice(list(SIZES)), r)
        twin = next(j for j in insts[k + 1:] + insts[:k] if j.cls == inst.cls)
        c = render(twin, r.choice(sorted(BACKGROUNDS)), r.choice(list(SIZES)), r)
        same.append(metric.identity(a, [b]))
        other.append(metric.identity(a, [c]))
    margins = [s - o for s, o in zip(same, other)]
    mean_se = cmdline.mean_se
    return {"prompt_following": {f: mean_se(v) for f, v in correct.items()},
            "identity": {"same_instance": mean_se(same), "other_instance_same_class": mean_se(other),
                         "margin": mean_se(margins)},
            "settings": {"n_prompts": n_prompts, "sampling_steps": steps, "seed": seed}}


# ----------------------------------------------------------------------------------------


STAGES = ("world", "vae", "clip-h", "clip-b", "t2i", "competence")


@dataclass
class Config:
    out: str = "runs/toyworld"  # where the world and its models go
    stage: str = "all"  # one of world, vae, clip-h, clip-b, t2i, competence; or all (finished stages are skipped)
    n_train: int = 20_000  # rendered training pictures (the first 4,000 are also written as PNGs for DATE)
    vae_steps: int = 600  # VAE training steps
    clip_steps: int = 1_000  # steps for each CLIP
    t2i_steps: int = 5_000  # text encoder + UNet steps
    batch_size: int = 32  # training batch of the VAE and the text-to-image model
    clip_batch_size: int = 64  # training batch of the CLIPs (contrastive: more negatives)
    competence_prompts: int = 60  # generated images for the prompt-following measurement
    competence_steps: int = 25  # DDIM steps of those images
    seed: int = 0  # fixes the world, every model's initialisation and every batch


def done(out: str, stage: str) -> bool:
    # (world: a world rendered before OUT/heldout/ existed is rendered again, identically: 20 s)
    return {"world": all(os.path.exists(os.path.join(out, f)) for f in ("world.pt", "heldout", "second-photos")),
            "vae": os.path.isfile(os.path.join(out, "sd", "vae", "diffusion_pytorch_model.safetensors")),
            "clip-h": os.path.isfile(os.path.join(out, "clip-h", "open_clip_model.safetensors")),
            "clip-b": os.path.isfile(os.path.join(out, "clip-b", "open_clip_model.safetensors")),
            "t2i": os.path.isfile(os.path.join(out, "sd", "model_index.json")),
            "competence": os.path.isfile(os.path.join(out, "competence.json"))}[stage]


def main(cfg: Config):
    os.makedirs(cfg.out, exist_ok=True)
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    times = {}
    for stage in stages:
        if cfg.stage == "all" and done(cfg.out, stage):
            print(f"toyworld.py: {stage}: done already (delete its output to redo it)", file=sys.stderr)
            continue
        t0 = time.time()
        if stage == "world":
            stage_world(cfg.out, cfg.n_train, cfg.seed)
        elif stage == "vae":
            stage_vae(cfg.out, cfg.vae_steps, cfg.batch_size, cfg.seed)
        elif stage in ("clip-h", "clip-b"):
            stage_clip(stage, cfg.out, cfg.clip_steps, cfg.clip_batch_size, cfg.seed + (1 if stage == "clip-h" else 2))
        elif stage == "t2i":
            stage_t2i(cfg.out, cfg.t2i_steps, cfg.batch_size, cfg.seed)
        else:
            rep = competence(cfg.out, cfg.competence_prompts, cfg.competence_steps, cfg.seed)
            with open(os.path.join(cfg.out, "competence.json"), "w") as f:
                json.dump(rep, f, indent=2)
            print(json.dumps(rep))
        times[stage] = round(time.time() - t0, 1)
        print(f"toyworld.py: {stage}: {times[stage]} s", file=sys.stderr)
    return times


def parse_args(argv=None) -> Config:
    p = cmdline.config_parser(Config, __doc__.split("\n\n")[0].strip(), choices={"stage": STAGES + ("all",)})
    return Config(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cmdline.run_cli("toyworld.py", main, parse_args))
