"""
sample.py -- text-to-image with a concept file: prompts that mention S*.

Builds diffusers' StableDiffusionPipeline (DDIM, 50 steps, CFG 7.5) around the dual-path
attention processors (Eq. 5) and the concept's per-layer LoRA (Eq. 2). The prompt is encoded
twice: C with the soft token v* at S*, and C_h with its nearest real token (Sec. 4.3); the
pipeline gets C as prompt_embeds, and C_h, the LoRA and alpha_blend via cross_attention_kwargs.
With classifier-free guidance the unconditional half uses the negative prompt on both paths.

    python sample.py --prompt "a photo of S* on the beach"                 # concept.pt, sd15
    python sample.py --concept concept.pt --prompt "a photo of S* in the gladiator movie" --seed 1
    python sample.py --concept none --preset tiny --prompt "a photo of a dog"   # plain SD
    python sample.py --concept concept.pt --prompt "a photo of S*" --num-images 4 --benchmark [--compile]
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

# diffusers, transformers, open_clip and matplotlib are imported inside the functions that use them:
# importing them takes 5-10 s, and --help and one-line input errors should answer at once.
import torch
from PIL import Image
from tqdm import tqdm

import cmdline
import dualpath
import model


@dataclass
class Config:
    prompt: str = ""  # must mention the placeholder (S*) to use the concept's word
    concept: str = "concept.pt"  # tune.py output, or "none" = plain Stable Diffusion
    negative_prompt: str = ""  # what to steer away from (the unconditional half of guidance)
    num_images: int = 4  # images to generate; each PNG is written as soon as it is done
    batch_size: int = 4  # images per pipeline call (memory grows with it)
    steps: int = 50  # DDIM steps
    guidance: float = 7.5  # classifier-free guidance scale
    seed: int = 0  # image i uses seed + i, so the same seed gives the same pixels
    alpha_blend: float | None = None  # Eq. (5) alpha; default: the one stored in the concept file
    out: str = "samples"  # folder for the PNGs and the grid (created if missing)
    preset: str | None = None  # default: the concept's preset (sd15 for --concept none)
    base: str | None = None  # sd15: SD 1.5 hub id or folder (default: the concept's)
    device: str | None = None  # default: cuda if available, else cpu
    compile: bool = False  # torch.compile the UNet (processors included); warm-up not timed
    benchmark: bool = False  # also time plain SD in the same run; end with one JSON line


UserError = cmdline.UserError  # bad input: one line on stderr, exit code 2


def parse_args(argv=None) -> Config:
    p = cmdline.config_parser(Config, __doc__.split("\n\n")[0].strip(), required=("prompt",),
                              choices={"preset": model.PRESETS})
    return Config(**vars(p.parse_args(argv)))


def build_pipeline(comps):
    """StableDiffusionPipeline over these components with SD 1.5's DDIM sampler, no safety checker."""
    from diffusers import StableDiffusionPipeline

    # NOTE: no safety checker. It is a second ~1.2 GB model that blacks out images it flags; a
    # research reference implementation measures what the method generates, and the checker
    # would silently change CLIP scores. Add one yourself if you deploy this.
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=model.sampling_scheduler(comps.noise_scheduler),
                                   safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(leave=False, desc="denoising")
    return pipe


@torch.no_grad()
def generate(pipe, comps, concept: dict | None, prompt: str, negative_prompt: str = "", num_images: int = 4,
             steps: int = 50, guidance: float = 7.5, seed: int = 0, alpha_blend: float | None = None,
             output_type: str = "pil", on_step=None):
    """Images for one prompt. concept=None: plain Stable Diffusion (the prompt goes to the
    pipeline as a string). Image i uses generator seed + i. The plain function behind sample.py.
    on_step(step index), if given, runs after each denoising step (demo.py: progress and Cancel)."""
    device = comps.token_table.device
    gens = [torch.Generator(device).manual_seed(seed + i) for i in range(num_images)]
    common = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type=output_type,
                  height=comps.cfg.resolution, width=comps.cfg.resolution)
    if on_step is not None:
        def step_end(pipe, i, t, kwargs):
            on_step(i)
            return kwargs

        common["callback_on_step_end"] = step_end
    if concept is None:
        return pipe(prompt=[prompt] * num_images, negative_prompt=[negative_prompt] * num_images, **common).images

    if not dualpath.dual_path_installed(comps.unet):  # else ΔW and the hard path would be dropped without an error
        dualpath.install_dual_path(comps.unet)
    te, tok = comps.text_encoder, comps.tokenizer
    C, C_h = model.encode_concept_prompts(te, tok, concept, [prompt] * num_images)  # (n, 77, D) soft and hard
    neg = model.encode_prompt(te, tok, [negative_prompt] * num_images, placeholder=concept["placeholder"])  # uncond
    dtype = next(comps.unet.parameters()).dtype
    hard = torch.cat([neg, C_h]) if guidance > 1 else C_h  # the pipeline's CFG batch is [uncond; cond]
    alpha = concept["alpha_blend"] if alpha_blend is None else alpha_blend
    kw = dualpath.dual_path_kwargs(model.concept_lora(concept, device, dtype), hard.to(dtype), alpha=alpha,
                                   lora_scale=concept["lora_scale"])
    return pipe(prompt_embeds=C.to(dtype), negative_prompt_embeds=neg.to(dtype), cross_attention_kwargs=kw,
                **common).images


def generate_in_batches(pipe, comps, concept, prompt: str, args: dict, num_images: int, batch: int, seed: int, device,
                        on_batch=None):
    """generate() in batches of `batch`; image i always uses seed + i. on_batch(first index,
    images) runs after each batch (sample.py writes the PNGs there). Returns (images, seconds
    spent generating, the device synchronised around each call)."""
    images, seconds = [], 0.0
    for first in range(0, num_images, batch):
        n = min(batch, num_images - first)
        cmdline.sync(device)
        t0 = time.perf_counter()
        done = generate(pipe, comps, concept, prompt, **args, num_images=n, seed=seed + first)
        cmdline.sync(device)
        seconds += time.perf_counter() - t0
        if on_batch is not None:
            on_batch(first, done)
        images += done
    return images, seconds


def slug(text: str, n: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("*", "x")).strip("-")[:n] or "prompt"


def grid(images):
    """Side-by-side grid of PIL images (up to 4 per row)."""
    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    g = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g


def save_png(image, path: str):
    cmdline.atomic_write(path, image.save)


def check_config(cfg: Config):
    if not cfg.prompt.strip():
        raise UserError("--prompt must not be empty")
    if cfg.steps <= 0:
        raise UserError(f"--steps must be positive, got {cfg.steps}")
    if cfg.num_images <= 0:
        raise UserError(f"--num-images must be positive, got {cfg.num_images}")
    if cfg.alpha_blend is not None and not 0.0 <= cfg.alpha_blend <= 1.0:
        raise UserError(f"--alpha-blend must be in [0, 1], got {cfg.alpha_blend}")
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {cfg.guidance}")
    cmdline.check_output(cfg.out, "folder")


def load_concept_checked(cfg: Config):
    """(concept or None, preset) with one-line errors."""
    if cfg.concept.lower() == "none":
        return None, cfg.preset or "sd15"
    if not os.path.isfile(cfg.concept):
        raise UserError(f"no concept file at {cfg.concept}; "
                        f"make one with `python tune.py --image IMG --out {cfg.concept}`")
    try:
        concept = model.load_concept(cfg.concept)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.preset and cfg.preset != concept["preset"]:
        raise UserError(f"{cfg.concept} was tuned for preset {concept['preset']!r}, not {cfg.preset!r}: sample it "
                        f"with --preset {concept['preset']}, or tune a concept for {cfg.preset} with "
                        f"`python tune.py --preset {cfg.preset} --image IMG`")
    try:
        model.check_same_weights(f"the concept {cfg.concept}", concept, cfg.base, None)
    except ValueError as e:
        raise UserError(str(e)) from None
    return concept, concept["preset"]


def check_concept_fits(concept: dict, path: str, comps, names: list[str]):
    """The concept against the loaded text encoder and UNet (v* width, its hard token, every LoRA
    layer's shapes): a one-line UserError if it does not fit. Warns when v*'s nearest word in this
    text encoder is not the one stored (weights other than those it was tuned on)."""
    try:
        model.check_concept_fits(concept, path, model.architecture_of(comps, names), comps.tokenizer)
    except ValueError as e:
        raise UserError(str(e)) from None
    v = concept["v_star"].to(comps.token_table.device)[None]
    nearest = int(model.nearest_tokens(v, comps.token_table, k=1)[0][0, 0])
    if nearest != concept["token_id"]:
        word = model.token_word(comps.tokenizer, nearest)
        warnings.warn(f"v*'s nearest word in this text encoder is {word!r}, not the file's {concept['token']!r}: "
                      f"was the concept tuned on other weights? (C_h keeps the file's word)")


def benchmark_plain(cfg: Config, pipe, comps, concept, preset: str, args: dict, batch: int, s_per_image: float,
                    device):
    """--benchmark: plain SD on the same prompt (the concept's real token instead of S*), same
    run and settings; one JSON line with both speeds and their ratio."""
    plain_prompt = cfg.prompt.replace(concept["placeholder"], concept["token"]) if concept else cfg.prompt
    if cfg.compile:
        generate(pipe, comps, None, plain_prompt, **{**args, "steps": 3}, num_images=batch, seed=cfg.seed)
    _, plain = generate_in_batches(pipe, comps, None, plain_prompt, args, cfg.num_images, batch, cfg.seed, device)
    plain /= cfg.num_images
    print(json.dumps({"what": "sample", "preset": preset, "device": cmdline.device_name(device),
                      "num_images": cfg.num_images, "batch_size": batch, "steps": cfg.steps, "compile": cfg.compile,
                      "s_per_image": round(s_per_image, 4), "plain_s_per_image": round(plain, 4),
                      "ratio": round(s_per_image / plain, 3), "peak_gb": round(cmdline.peak_memory_gb(device), 3)}))


def main(cfg: Config):
    # 1) Check the inputs before loading anything heavy.
    check_config(cfg)
    concept, preset = load_concept_checked(cfg)
    try:  # a placeholder past the 75 tokens the text encoder reads is an error, not a silent cut
        placeholder = concept["placeholder"] if concept else model.PLACEHOLDER
        model.tokenize_with_placeholder(model.build_tokenizer(), [cfg.prompt], placeholder)
    except model.PromptTooLong as e:
        raise UserError(str(e)) from None
    if concept is not None and concept["placeholder"] not in cfg.prompt:
        warnings.warn(f"the prompt does not mention {concept['placeholder']}: the concept's word is unused "
                      f"(its LoRA still applies)")
    device = cmdline.resolve_device(cfg.device)
    base = cfg.base or (concept or {}).get("base") or None

    # 2) Frozen parts (no image tower needed), dual-path processors, the pipeline.
    comps = model.load_components(preset, device=device, dtype=model.frozen_dtype(device), base=base,
                                  with_image_encoder=False)
    names = dualpath.install_dual_path(comps.unet)
    if concept is not None:
        check_concept_fits(concept, cfg.concept, comps, names)
    pipe = build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)  # one bar over the images instead
    if cfg.compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        pipe.unet = torch.compile(comps.unet, mode=mode)
    args = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,
                alpha_blend=cfg.alpha_blend)
    batch = min(cfg.batch_size, cfg.num_images)
    if cfg.compile:  # warm-up (compilation, CUDA-graph warm-up and capture) is not counted
        generate(pipe, comps, concept, cfg.prompt, **{**args, "steps": 3}, num_images=batch, seed=cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 3) Generate in batches; each PNG is written (atomically) as soon as its batch is done, so
    #    Ctrl-C keeps what was finished. Image i always uses seed + i, whatever the batch size.
    stem = f"{slug(cfg.prompt)}_s{cfg.seed}"

    with tqdm(total=cfg.num_images, desc="images", dynamic_ncols=True, disable=cfg.num_images < 2) as bar:
        def on_batch(first, done):  # write this batch's PNGs at once
            for i, im in enumerate(done):
                save_png(im, os.path.join(cfg.out, f"{stem}_{first + i:02d}.png"))
            bar.update(len(done))

        images, seconds = generate_in_batches(pipe, comps, concept, cfg.prompt, args, cfg.num_images, batch, cfg.seed,
                                              device, on_batch=on_batch)
    s_per_image = seconds / cfg.num_images
    save_png(grid(images), os.path.join(cfg.out, f"{stem}_grid.png"))
    print(f"wrote {len(images)} images and {stem}_grid.png to {cfg.out}/ ({s_per_image:.3f} s/image, "
          f"{cmdline.device_name(device)})", file=sys.stderr)

    if cfg.benchmark:
        benchmark_plain(cfg, pipe, comps, concept, preset, args, batch, s_per_image, device)
    return images


def cli(argv=None) -> int:
    return cmdline.run_cli("sample.py", main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
