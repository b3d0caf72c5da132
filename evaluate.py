"""
evaluate.py -- CLIP identity and prompt similarity (Sec. 5.1) for every comparison of Sec. 5.

For every concept image and every variant, tune a concept (tune.py's tune_concept or
baseline_concept), generate --num-images images per prompt (sample.py's generate), and score
them with open_clip ViT-B-16 (QuickGELU, as the OpenAI weights were trained):
    identity (CLIP-I)  mean cosine between the input image and each generated image
    prompt   (CLIP-T)  mean cosine between each generated image and its prompt with S*
                       replaced by the concept's class noun ("a photo of S* on the beach"
                       -> "a photo of dog on the beach")
Variants
    Fig. 5b ablations (Sec. 5.4): full | no_tuning (0 steps) | no_dual_path (alpha = 1) |
        no_hypernet (an encoder pre-trained with --no-hypernet: --no-hypernet-encoder PATH) |
        lora_from_zero (the full encoder, its predicted LoRA replaced by a zero LoRA at tuning time)
    Fig. 5a one-image baselines (Sec. 5.3): textual_inversion | lora (--baseline-batch-size views a
        step: 4, their references' 1 image x 4 accumulation steps; the DATE variants --batch-size 16)
    --variants paper runs all of them.

    python evaluate.py --images eval_set/ --prompts prompts.txt
    python evaluate.py --images eval_set/ --variants paper --no-hypernet-encoder runs/nohyper/encoder.pt
    python evaluate.py --images examples/ --preset tiny --encoder random --num-images 2 --steps 10

Writes OUT/metrics.json, OUT/metrics.md (tables: each variant's means with tuning times, what
its v* reads as, and every variant minus full paired by concept), OUT/tradeoff.png (Fig. 5a
and 5b panels), OUT/grid.png (input photo, then one image per prompt, per variant: Fig. 3/4
style) and the images under OUT/images/. Re-running with the same --out reuses finished
concepts and images. On a CPU, --jobs 2 tunes and draws in two one-thread processes (the same
numbers as --jobs 1 on one thread; faster where one process leaves the second core half idle).
"""
from __future__ import annotations

from collections import Counter
import dataclasses
import hashlib
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass

# diffusers, transformers, open_clip and matplotlib are imported inside the functions that use them:
# importing them takes 5-10 s, and --help and one-line input errors should answer at once.
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import cmdline
import data as data_lib
import model
import sample
import tune

ABLATIONS = ("full", "no_tuning", "no_dual_path", "no_hypernet", "lora_from_zero")  # Fig. 5b
BASELINES = ("textual_inversion", "lora")  # Fig. 5a, beside "full"
VARIANTS = ABLATIONS + BASELINES
DEFAULT_VARIANTS = ("full", "no_tuning", "no_dual_path", "lora_from_zero")  # need only the one encoder

# Our built-in evaluation prompts: recontextualisation, style, and property changes.
DEFAULT_PROMPTS = [
    "a photo of S*",
    "a photo of S* in the gladiator movie",
    "a photo of S* on the beach",
    "a photo of S* in the snow",
    "a photo of S* in the jungle",
    "a photo of S* on top of a wooden table",
    "a photo of S* in front of the Eiffel Tower",
    "a photo of S* floating in an ocean of milk",
    "a photo of S* on the moon",
    "a photo of S* in a living room",
    "an oil painting of S*",
    "a watercolor painting of S*",
    "a pencil sketch of S*",
    "S* in the style of Van Gogh",
    "a cubist painting of S*",
    "a photo of a red S*",
    "a photo of S* made of lego",
    "a photo of S* wearing a santa hat",
    "a photo of S* at night under city lights",
    "a 3D render of S* in a futuristic city",
]


@dataclass
class Config:
    images: str = ""  # folder: one concept per image file (classes.csv `file,noun` optional)
    prompts: str | None = None  # one prompt per line, each with S*; default: the built-in list
    encoder: str = "runs/pretrain/encoder.pt"  # pretrain.py checkpoint, or "random"
    no_hypernet_encoder: str | None = None  # pretrain.py --no-hypernet checkpoint, for the no_hypernet variant
    preset: str | None = None  # default: the one recorded in the encoder checkpoint
    variants: str = ",".join(DEFAULT_VARIANTS)  # comma list of variants (listed below), or "paper" for all seven
    num_images: int = 4  # generated images per prompt
    steps: int = 50  # DDIM sampling steps
    guidance: float = 7.5  # classifier-free guidance scale
    tune_steps: int = 12  # tuning steps of the DATE variants that tune
    tune_lr: float = tune.Config.lr  # their learning rate (Sec. 5.1)
    lambda_anchor: float = tune.Config.lambda_anchor  # Sec. 4.4 anchor of the DATE variants that tune
    hard_token: str = tune.Config.hard_token  # C_h's word while tuning: "encoder" (the prediction's) or "tuned" (v*'s)
    batch_size: int = 16  # tuning batch (augmented views) of the DATE variants (Sec. 4.4: E4T's minimum of 16)
    # NOTE: until this, the baselines tuned at DATE's batch of 16. Their references train on 4 views
    # a step (1 image x 4 gradient-accumulation steps, both examples), and at 16 they took ~3x as long.
    baseline_batch_size: int = tune.BASELINES["textual_inversion"]["batch_size"]  # TI / LoRA baselines' batch (views)
    ti_steps: int = tune.BASELINES["textual_inversion"]["steps"]  # TI baseline steps (diffusers' TI example)
    ti_lr: float = tune.BASELINES["textual_inversion"]["lr"]  # TI baseline lr (diffusers' TI example)
    lora_steps: int = tune.BASELINES["lora"]["steps"]  # lora baseline steps (Sec. 5.1: 2,000 for LoRA-PTI)
    lora_lr: float = tune.BASELINES["lora"]["lr"]  # lora baseline LoRA lr (cloneofsimo/lora PTI; v: 5e-4)
    seed: int = 0  # fixes tuning and sampling
    out: str = "runs/eval"  # output folder (metrics, plot, concepts, images)
    fresh: bool = False  # ignore what an earlier run with the same --out finished
    device: str | None = None  # default: cuda if available, else cpu
    base: str = model.SD15_BASE  # sd15: SD 1.5 hub id or local folder
    clip: str = model.SD15_CLIP[1]  # sd15: open_clip tag or local file for ViT-H-14
    eval_clip: str = "openai"  # metric CLIP: sd15: a ViT-B-16 tag or OpenAI weights file; toy: runs/toyworld/clip-b
    judge: str | None = None  # toy: the world's ground-truth judge (default: judge.pt beside --base's folder)
    jobs: int = 1  # CPU only: tune and draw in this many one-thread worker processes, then score (2 on 2 cores)


UserError = cmdline.UserError  # bad input: one line on stderr, exit code 2


def parse_args(argv=None) -> Config:
    p = cmdline.config_parser(Config, __doc__.split("\n\n")[0].strip(), required=("images",),
                              choices={"preset": model.PRESETS, "hard_token": tune.HARD_TOKEN_CHOICES})
    p.epilog = "variants: " + ", ".join(VARIANTS)
    return Config(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------
# The metric model (Sec. 5.1: "All reported metrics are based on a pre-trained ViT-B-16 model")


def metric_clip_model(preset: str, pretrained: str, device):
    """The metric CLIP of Sec. 5.1: ViT-B-16 with its OpenAI weights (sd15), the same
    architecture with random weights (sd15-arch), or a tiny seeded random CLIP (tiny).

    The OpenAI weights were trained with QuickGELU; model.open_clip_model builds the
    activation the weights need (open_clip's plain "ViT-B-16" has nn.GELU).
    """
    import open_clip

    if preset == "sd15":  # a local file is taken to hold the OpenAI weights
        return model.open_clip_model("ViT-B-16", pretrained, device, file_quick_gelu=True)
    if preset == "toy":  # toyworld.py's metric CLIP, an open_clip folder (its config names the activation)
        folder = model.TOY_METRIC_CLIP if pretrained in (None, "openai") else pretrained
        return model.open_clip_model("ViT-B-16", folder, device, file_quick_gelu=True)
    if preset == "sd15-arch":  # the real architecture (OpenAI's, QuickGELU), random weights
        return model.open_clip_model("ViT-B-16", None, device, file_quick_gelu=True, quick_gelu=True)
    # NOTE: tiny has no real weights; a tiny random CLIP exercises the code path.
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=32, image_size=224),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
            quick_gelu=True,
        ).to(device)


class ClipMetric:
    """CLIP-I and CLIP-T with the metric CLIP (see metric_clip_model)."""

    def __init__(self, preset: str, device, pretrained: str = "openai"):
        import open_clip

        self.model = metric_clip_model(preset, pretrained, device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16")  # the CLIP BPE, shipped with open_clip
        self.device = device
        self.last_texts: list[str] = []  # what the text tower was fed last (for tests and debugging)

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """PIL images -> L2-normalised embeddings (N, E); centre square crop at the model's input
        size (224 px for ViT-B-16), CLIP mean/std."""
        size = self.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        x = torch.stack([data_lib.clip_tensor(data_lib.centre_square(im.convert("RGB")), size)
                         for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        self.last_texts = list(texts)
        tokens = self.tokenizer(texts, context_length=self.model.context_length).to(self.device)  # 77 for CLIP
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def identity(self, reference, generated) -> float:
        """CLIP-I: mean cosine between the reference image and each generated image."""
        return (self.image_features(generated) @ self.image_features([reference])[0]).mean().item()

    def prompt_similarity(self, generated, text: str) -> float:
        """CLIP-T: mean cosine between each generated image and the text."""
        return (self.image_features(generated) @ self.text_features([text])[0]).mean().item()


class Judge:
    """The toy world's ground truth (toyworld.py trains it on the world's labels): reads each
    generated picture's class, pattern, colours, background and size. The concept's own factors
    are scored against IMAGES/labels.json (what the world wrote for each photo), the context
    against the words of the prompt ("... on a red background" -> background red). In a world
    with a ground truth, this is what CLIP-I and CLIP-T stand in for."""

    CONCEPT = ("class", "pattern", "colours")
    PROMPT = ("background", "size")

    def __init__(self, path: str, labels_path: str):
        import toyworld  # (toyworld imports this file: imported here, where a judge is used)

        self.model = toyworld.load_judge(path)
        self.options = toyworld.JUDGE_FACTORS
        with open(labels_path) as f:
            self.labels = json.load(f)

    def scores(self, file: str, prompt: str, images) -> dict:
        """{factor: fraction of the images the judge reads as the concept's / the prompt's}."""
        want = {f: self.labels[file][f] for f in self.CONCEPT}
        want["colours"] = frozenset(want["colours"])
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        for f in self.PROMPT:
            named = [o for o in self.options[f] if o in words]
            if len(named) == 1:  # a prompt that names no background (or two) is not scored on it
                want[f] = named[0]
        verdicts = self.model.read(images)
        return {f: sum(v[f] == w for v in verdicts) / len(verdicts) for f, w in want.items()}


def open_judge(cfg: Config, preset: str, base: str, files: list[str]) -> Judge | None:
    """The judge of a toy evaluation (--judge, or judge.pt beside the --base folder), or None."""
    path = cfg.judge
    if path is None:
        if preset != "toy":
            return None
        path = os.path.join(os.path.dirname(os.path.normpath(base)), "judge.pt")
        if not os.path.isfile(path):
            print(f"evaluate.py: note: no judge at {path}: scoring with CLIP only", file=sys.stderr)
            return None
    labels = os.path.join(cfg.images, "labels.json")
    if not os.path.isfile(path) or not os.path.isfile(labels):
        raise UserError(f"--judge needs the judge file ({path}) and the photos' labels ({labels}); "
                        f"toyworld.py writes both")
    judge = Judge(path, labels)
    unlabelled = [f for f in files if f not in judge.labels]
    if unlabelled:
        raise UserError(f"--judge: {labels} has no labels for {unlabelled[0]}")
    return judge


def noun_prompt(prompt: str, noun: str, placeholder: str = model.PLACEHOLDER) -> str:
    """The text CLIP-T scores against: the prompt with S* replaced by the class noun."""
    return prompt.replace(placeholder, noun)


def variant_config(cfg: Config, variant: str, image_path: str) -> tune.Config:
    """tune.py settings of one DATE variant (Sec. 5.4)."""
    tc = tune.Config(image=image_path, encoder=cfg.encoder, steps=cfg.tune_steps, lr=cfg.tune_lr,
                     batch_size=cfg.batch_size, lambda_anchor=cfg.lambda_anchor, hard_token=cfg.hard_token,
                     seed=cfg.seed, base=cfg.base, clip=cfg.clip)
    if variant == "no_tuning":
        tc.steps = 0
    elif variant == "no_dual_path":
        tc.alpha_blend = 1.0
    elif variant == "no_hypernet":  # the paper's ablation: an encoder pre-trained without one
        tc.encoder = cfg.no_hypernet_encoder
    elif variant == "lora_from_zero":  # the full encoder's LoRA dropped at tuning time
        tc.hypernet = False
    return tc


def variant_settings(cfg: Config, variant: str) -> dict:
    """What fixes a variant's concept (compared with a cached concept's recorded settings)."""
    if variant in BASELINES:
        steps, lr = (cfg.ti_steps, cfg.ti_lr) if variant == "textual_inversion" else (cfg.lora_steps, cfg.lora_lr)
        return {"method": variant, "steps": steps, "lr": lr, "batch_size": cfg.baseline_batch_size, "seed": cfg.seed,
                "alpha_blend": 1.0}
    tc = variant_config(cfg, variant, "")
    return {"method": "date", "steps": tc.steps, "lr": tc.lr, "batch_size": tc.batch_size, "seed": tc.seed,
            "lambda_anchor": tc.lambda_anchor, "hard_token": tc.hard_token, "encoder": tc.encoder,
            "hypernet": variant not in ("no_hypernet", "lora_from_zero"), "alpha_blend": tc.alpha_blend}


def cached_concept(path: str, settings: dict) -> dict | None:
    """The concept a previous run saved at `path`, if it was tuned with the same settings."""
    if not os.path.isfile(path):
        return None
    try:
        concept = model.load_concept(path)
    except ValueError:
        return None
    recorded = {**concept.get("tuning", {}), "alpha_blend": concept.get("alpha_blend")}
    return concept if all(recorded.get(k) == v for k, v in settings.items()) else None


def drawing_seed(cfg: Config, concept_file: str, j: int) -> int:
    """The sampler seed of prompt j for one concept (image k uses this + k).

    Every variant draws a concept with the same noises (the variants stay paired), but each
    concept gets noises of its own, from its file name, so that adding or removing a file
    changes no other concept's pictures. NOTE: until this, every concept drew prompt j from
    seed + 1000 j; then a table of 12 concepts x 4 prompts x 2 images held only 8 noises, and
    whatever the noise decides for itself (in the toy world: the background, the colours) was
    measured on 8 draws, not on 96, with standard errors as if on 96."""
    stem = os.path.splitext(os.path.basename(concept_file))[0]
    return cfg.seed + 1000 * j + 1_000_000 * (zlib.crc32(stem.encode()) % 100_000)


def image_key(concept: dict, prompt: str, cfg: Config, seed: int) -> str:
    """Short hash of what fixes the generated pixels: the concept (v*, its hard token, every LoRA
    weight, alpha and the LoRA scale), the prompt and the sampler (steps, guidance, `seed`: the
    drawing_seed of the first picture)."""
    h = hashlib.sha1()
    h.update(concept["v_star"].numpy().tobytes())
    for name in sorted(concept["lora_A"]):
        h.update(name.encode() + concept["lora_A"][name].numpy().tobytes() + concept["lora_B"][name].numpy().tobytes())
    h.update(repr((concept["token_id"], concept["alpha_blend"], concept["lora_scale"], concept.get("final_loss"),
                   prompt, cfg.steps, cfg.guidance, seed)).encode())
    return h.hexdigest()[:8]


def read_prompts(cfg: Config) -> list[str]:
    if cfg.prompts is None:
        return list(DEFAULT_PROMPTS)
    if not os.path.isfile(cfg.prompts):
        raise UserError(f"--prompts: no such file: {cfg.prompts}")
    with open(cfg.prompts) as f:  # one prompt a line; blank lines and "# comments" are skipped
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts: {cfg.prompts} holds no prompt")
    missing = [p for p in prompts if model.PLACEHOLDER not in p]
    if missing:
        raise UserError(f"--prompts: {len(missing)} prompt(s) without {model.PLACEHOLDER}, e.g. {missing[0]!r}")
    try:
        model.tokenize_with_placeholder(model.build_tokenizer(), prompts)
    except model.PromptTooLong as e:
        raise UserError(f"--prompts: {e}") from None
    return prompts


def check_inputs(cfg: Config):
    if not os.path.isdir(cfg.images):
        raise UserError(f"--images: no such folder: {cfg.images}")
    entries = sorted(os.listdir(cfg.images))
    files = [f for f in entries if os.path.splitext(f)[1].lower() in data_lib.IMAGE_EXTS
             and os.path.isfile(os.path.join(cfg.images, f))]
    if not files:
        raise UserError(f"--images: no image files in {cfg.images}")
    folders = [f for f in entries if os.path.isdir(os.path.join(cfg.images, f))]
    if folders:
        print(f"evaluate.py: note: sub-folders of --images are not searched ({', '.join(folders[:3])}"
              f"{' ...' if len(folders) > 3 else ''}): one concept is one image file in {cfg.images}", file=sys.stderr)
    names = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    variants = list(VARIANTS) if cfg.variants.strip() == "paper" else names
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"--variants: unknown {unknown or cfg.variants!r}; choose from {', '.join(VARIANTS)} or paper")
    for flag, val in (("--num-images", cfg.num_images), ("--steps", cfg.steps), ("--batch-size", cfg.batch_size),
                      ("--baseline-batch-size", cfg.baseline_batch_size),
                      ("--ti-steps", cfg.ti_steps), ("--lora-steps", cfg.lora_steps), ("--jobs", cfg.jobs)):
        if val <= 0:
            raise UserError(f"{flag} must be positive, got {val}")
    if cfg.tune_steps < 0 or not cfg.lambda_anchor >= 0:
        raise UserError(f"--tune-steps and --lambda-anchor must be >= 0, got {cfg.tune_steps} and {cfg.lambda_anchor}")
    if not (cfg.tune_lr > 0 and cfg.ti_lr > 0 and cfg.lora_lr > 0) or cfg.guidance < 0:
        raise UserError("--tune-lr, --ti-lr and --lora-lr must be positive and --guidance >= 0")
    tune.check_hard_token(cfg.hard_token)  # the CLI's choices; a Python caller may pass anything
    cmdline.check_output(cfg.out, "folder")
    if "no_hypernet" in variants and not cfg.no_hypernet_encoder:
        raise UserError("the no_hypernet variant needs an encoder pre-trained without the hypernetwork: "
                        "train one with `python pretrain.py --no-hypernet ...` and pass --no-hypernet-encoder PATH")
    return files, variants, read_prompts(cfg)


def plot_tradeoff(summary: dict, path: str):
    """Fig. 5 style: prompt similarity (x) vs identity (y), one point per variant with SE bars.

    Panel (a): DATE ("full") beside the one-image baselines, with their mean tuning time;
    panel (b): the ablations. A panel with no variant of its own is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("(a) methods, one image", ["full"] + [v for v in BASELINES if v in summary]),
              ("(b) ablations", [v for v in ABLATIONS if v in summary])]
    panels = [(title, [v for v in names if v in summary]) for title, names in panels if len(names) > 1]
    panels = panels or [("identity vs. prompt", list(summary))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            s = summary[name]
            # Names (and in panel (a) the tuning time) go in the legend, not beside the points:
            # close points would make their labels overlap.
            label = f"{name} ({s['tune_s']['mean']:.1f} s tuning)" if title.startswith("(a)") else name
            ax.errorbar(s["prompt"]["mean"], s["identity"]["mean"], xerr=s["prompt"]["se"], yerr=s["identity"]["se"],
                        fmt="o", capsize=3, label=label)
        ax.set_xlabel("prompt similarity (CLIP-T)")
        ax.set_ylabel("identity similarity (CLIP-I)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.margins(0.25)
        ax.locator_params(nbins=5)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    cmdline.atomic_write(path, fig.savefig)
    plt.close(fig)


def image_grid(results: dict, images: dict, files: list[str], prompts: list[str], out: str, path: str,
               max_concepts: int = 4, tile: int = 96):
    """A Fig. 3/4-style grid: for each of the first concepts, one row per variant -- the input
    photo, then the first generated image of every prompt. Column headers are prompt numbers
    (the prompts are listed in metrics.md / metrics.json)."""
    variants = list(results)
    stems = [os.path.splitext(f)[0] for f in files][:max_concepts]
    label_w = 110
    grid = Image.new("RGB", (label_w + tile * (1 + len(prompts)), 16 + tile * len(stems) * len(variants)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w + 4, 2), "input", fill="black")
    for j in range(len(prompts)):
        draw.text((label_w + tile * (1 + j) + 4, 2), f"prompt {j + 1}", fill="black")
    row = 0
    for f, stem in zip(files, stems):
        for variant in variants:
            y = 16 + row * tile
            draw.text((4, y + tile // 2 - 12), f"{stem}\n{variant}", fill="black")
            grid.paste(images[f].convert("RGB").resize((tile, tile), Image.NEAREST), (label_w, y))
            cells = results[variant][stem]["prompts"]
            for j, prompt in enumerate(prompts):
                with Image.open(os.path.join(out, cells[prompt]["images"][0])) as im:
                    grid.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (label_w + tile * (1 + j), y))
            row += 1
    cmdline.atomic_write(path, grid.save)


def write_text(path: str, text: str):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    cmdline.atomic_write(path, write)


def v_star_summary(concepts: dict, v: torch.Tensor) -> dict:
    """What a variant's v* read as (Sec. 4.2) and whether they collapsed (Sec. 5.2): the hard
    tokens with their counts, how many concepts have their class noun among v*'s three nearest
    words, and the mean cosine between two concepts' v* (1 = one v* for every photo)."""
    tokens = Counter(c["token"] for c in concepts.values()).most_common()  # ties: in the order first met
    return {"hard_tokens": dict(tokens),
            "noun_in_3_nearest": cmdline.mean_se([float(c["noun"] in [w for w, _ in c["nearest_words"][:3]])
                                                  for c in concepts.values()]),
            "v_pairwise_cos": model.mean_pairwise_cosine(v),
            **tuning_drift(concepts)}


def tuning_record(tuning: dict) -> dict:
    """From a concept's tuning settings: v0's hard token and ||v* - v0|| / ||v0|| where DATE tuned
    from an encoder's prediction (steps > 0), else None for both (0 steps, the baselines)."""
    tuned = tuning.get("start_token") is not None and tuning.get("steps", 0) > 0
    return {"start_token": tuning["start_token"] if tuned else None, "v_shift": tuning["v_shift"] if tuned else None}


def tuning_drift(concepts: dict) -> dict:
    """How far DATE's tuning moved v* from the encoder's v0 (mean ||v* - v0|| / ||v0||), for how
    many concepts it changed v*'s nearest word, and for how many the hard token drawn by the dual
    path's original branch is no longer v0's nearest word (only with tune.py --hard-token tuned);
    {} for variants that do not tune from an encoder (tuning_record)."""
    tuned = [c for c in concepts.values() if c.get("start_token") is not None]
    if not tuned:
        return {}
    return {"v_shift": cmdline.mean_se([c["v_shift"] for c in tuned]),
            "nearest_changed": sum(c["start_token"] != c["nearest_words"][0][0] for c in tuned),
            "token_changed": sum(c["start_token"] != c["token"] for c in tuned), "n_tuned": len(tuned)}


def paired_with_full(results: dict, fields: list[str]) -> dict:
    """Each variant against `full`, paired by concept: {variant: {metric: mean ± SE over concepts of
    (variant - full)}}, each concept first averaged over its prompts and images. The variants meet
    the same photos, prompts and noises, so what the concepts share (how easy a photo is) cancels
    in the difference; and the concept, not the cell, is the unit that repeats (a concept's
    prompts share its v* and LoRA). The first table's SEs treat every cell as independent and
    ignore the pairing: two variants it calls equal may differ in the same direction for most
    concepts, and the other way round. Metrics: identity, prompt and the judge's `fields`.
    {} without a `full` or with < 2 concepts."""
    if "full" not in results or len(results["full"]) < 2:
        return {}
    metrics = ["identity", "prompt"] + list(fields)

    def value(cell: dict, m: str):
        """A cell's CLIP score (identity, prompt) or judge score for m; None where it has none."""
        return cell[m] if m in ("identity", "prompt") else cell["judge"].get(m)

    def means(concepts: dict) -> dict:
        """{concept: {metric: mean over its cells}}, a metric left out where no cell has it."""
        out = {}
        for f, concept in concepts.items():
            cells = list(concept["prompts"].values())
            out[f] = {}
            for m in metrics:
                vals = [x for x in (value(c, m) for c in cells) if x is not None]
                if vals:
                    out[f][m] = sum(vals) / len(vals)
        return out

    full = means(results["full"])
    out = {}
    for variant, concepts in results.items():
        if variant == "full":
            continue
        mine, out[variant] = means(concepts), {}
        for m in metrics:
            diffs = [mine[f][m] - full[f][m] for f in full if m in full[f] and m in mine.get(f, {})]
            if len(diffs) >= 2:
                out[variant][m] = cmdline.mean_se(diffs)
    return out


def judged_fields(summary: dict) -> list[str]:
    """The judge's attributes that some variant of the summary was scored on, in the judge's order."""
    return [f for f in Judge.CONCEPT + Judge.PROMPT if any(f in s.get("judge", {}) for s in summary.values())]


def _pm(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['se']:.{digits}f}"


def markdown_table(summary: dict, n_concepts: int, n_prompts: int, num_images: int, prompts=()) -> str:
    judged = judged_fields(summary)
    lines = [f"Identity (CLIP-I) and prompt (CLIP-T) similarity, mean ± standard error over "
             f"{n_concepts} concept(s) × {n_prompts} prompt(s), {num_images} image(s) each; tuning time per "
             f"concept (wall clock, mean ± SE)." + (" Judge: the fraction of generated images the world's judge "
                                                    "reads as the concept's class, pattern and colours and as the "
                                                    "prompt's background and size." if judged else ""), "",
             "| variant | identity (CLIP-I) | prompt (CLIP-T) | tuning time (s) |" + "".join(f" judge: {f} |"
                                                                                      for f in judged),
             "|---|---|---|---|" + "---|" * len(judged)]
    for name, s in summary.items():
        lines.append(f"| {name} | {_pm(s['identity'])} | {_pm(s['prompt'])} | {_pm(s['tune_s'], 2)} |"
                     + "".join(f" {_pm(s['judge'][f], 2) if f in s.get('judge', {}) else '-'} |" for f in judged))
    lines += ["", "What v* reads as (Sec. 4.2): each concept's hard token (the word the dual path's original "
              "branch draws: the encoder prediction's nearest word, or the tuned v*'s with --hard-token tuned), "
              "how many concepts have their class noun among v*'s three nearest words, and the mean cosine "
              "between the v* of two concepts (near 1: one v* for every photo, Sec. 5.2's mode collapse); for "
              "the variants that tune from the encoder, how far tuning moved v* (||v* - v0|| / ||v0||) and for "
              "how many concepts it changed v*'s nearest word and the hard token.", "",
              "| variant | hard tokens | class noun among 3 nearest | v* pairwise cosine | tuning moved v* | "
              "v*'s nearest word changed by tuning | hard token changed by tuning |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        cos = "-" if s["v_pairwise_cos"] is None else f"{s['v_pairwise_cos']:.3f}"
        nn3 = s["noun_in_3_nearest"]
        drift = (f"{_pm(s['v_shift'], 2)} | {s['nearest_changed']} / {s['n_tuned']} | {s['token_changed']} / "
                 f"{s['n_tuned']}" if "v_shift" in s else "- | - | -")
        lines.append(f"| {name} | {', '.join(f'{w} ×{c}' for w, c in s['hard_tokens'].items())} | "
                     f"{round(nn3['mean'] * nn3['n'])} / {nn3['n']} | {cos} | {drift} |")
    paired = {name: s["vs_full"] for name, s in summary.items() if s.get("vs_full")}
    if paired:
        metrics = [m for m in ["identity", "prompt"] + judged if any(m in d for d in paired.values())]
        head = {"identity": "CLIP-I", "prompt": "CLIP-T"}
        lines += ["", "Against full, paired by concept: variant - full, mean ± SE over the concepts (each concept "
                  "averaged over its prompts and images first). The variants draw the same photos, prompts and "
                  "noises, so this SE, not the one above, is the one to read when a variant is compared with "
                  "full: a difference of about 2 SE or more is one most concepts agree on.", "",
                  "| variant - full |" + "".join(f" {head.get(m, 'judge: ' + m)} |" for m in metrics),
                  "|---|" + "---|" * len(metrics)]
        for name, d in paired.items():
            cells = []
            for m in metrics:
                digits = 4 if m in head else 2
                cells.append(f"{d[m]['mean']:+.{digits}f} ± {d[m]['se']:.{digits}f}" if m in d else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if prompts:
        lines += ["", "Prompts (the columns of grid.png):", ""] + [f"{j + 1}. {p}" for j, p in enumerate(prompts)]
    return "\n".join(lines) + "\n"


def tune_variant(cfg: Config, variant: str, comps, encoders: dict, image, image_path: str, noun: str) -> dict:
    """Tune one concept of one variant, through the same functions tune.py runs."""
    if variant in BASELINES:
        st = variant_settings(cfg, variant)
        concept, _ = tune.baseline_concept(comps, image, variant, noun, steps=st["steps"], lr=st["lr"],
                                           batch_size=st["batch_size"], seed=cfg.seed, log=lambda s: None)
        return concept
    tc = variant_config(cfg, variant, image_path)
    concept, _ = tune.tune_concept(comps, encoders[tc.encoder], image, tc, log=lambda s: None)
    return concept


def load_encoders(cfg: Config, variants: list[str], comps, names, device) -> dict:
    """{checkpoint path: encoder} for the variants that need one (the no_hypernet ablation has its own)."""
    ckpt, _ = tune.load_encoder_checkpoint(tune.Config(encoder=cfg.encoder, preset=comps.preset, base=cfg.base,
                                                       clip=cfg.clip), prog="evaluate.py")
    encoders = {cfg.encoder: tune.build_tuning_encoder(ckpt, comps, names, cfg.seed, cfg.encoder).to(device)}
    if "no_hypernet" in variants:
        path = cfg.no_hypernet_encoder
        ckpt, _ = tune.load_encoder_checkpoint(tune.Config(encoder=path, preset=comps.preset, base=cfg.base,
                                                           clip=cfg.clip), prog="evaluate.py")
        if ckpt is None or ckpt.get("hypernet", True):
            raise UserError(f"--no-hypernet-encoder {path} was trained with a hypernetwork; "
                            f"train one with `python pretrain.py --no-hypernet ...`")
        encoders[path] = tune.build_tuning_encoder(ckpt, comps, names, cfg.seed, path).to(device)
    return encoders


def concept_and_images(cfg: Config, variant: str, f: str, prompts, nouns, images, comps, encoders, pipe, bar,
                       reused: dict):
    """Tune (or reuse) one concept of one variant and generate (or reuse) its images.
    Returns (concept, [(paths, images)] in the order of prompts); counts reuse in `reused`."""
    stem = os.path.splitext(f)[0]
    cdir = os.path.join(cfg.out, "concepts", variant)
    os.makedirs(cdir, exist_ok=True)
    cpath = os.path.join(cdir, f"{stem}.pt")
    concept = cached_concept(cpath, variant_settings(cfg, variant)) if not cfg.fresh else None
    if concept is not None:
        reused["concepts"] += 1
    else:
        bar.set_description(f"tuning {variant}/{stem}")
        concept = tune_variant(cfg, variant, comps, encoders, images[f], os.path.join(cfg.images, f), nouns[f])
        cmdline.atomic_save(concept, cpath)
    bar.set_description(f"sampling {variant}/{stem}")
    idir = os.path.join(cfg.out, "images", variant, stem)
    os.makedirs(idir, exist_ok=True)
    drawn = []
    for j, prompt in enumerate(prompts):
        seed = drawing_seed(cfg, f, j)
        key = image_key(concept, prompt, cfg, seed)  # a changed prompt, setting or concept never reuses
        paths = [os.path.join(idir, f"p{j:02d}_{key}_{k}.png") for k in range(cfg.num_images)]
        if all(os.path.isfile(p) for p in paths) and not cfg.fresh:
            gen = [Image.open(p).convert("RGB") for p in paths]
            reused["images"] += len(gen)
        else:
            gen = sample.generate(pipe, comps, concept, prompt, num_images=cfg.num_images, steps=cfg.steps,
                                  guidance=cfg.guidance, seed=seed)
            for im, p in zip(gen, paths):
                sample.save_png(im, p)
        drawn.append((paths, gen))
        bar.update(cfg.num_images)
    return concept, drawn


def run_variants(cfg: Config, variants, files, prompts, nouns, images, comps, encoders, pipe, metric, bar,
                 judge: Judge | None = None):
    """Tune (or reuse) every concept of every variant, generate (or reuse) its images, score them.
    Returns ({variant: {concept: scores}}, {"concepts": reused, "images": reused},
    {variant: the concepts' v* (n, D)})."""
    results, reused, v_stars = {}, {"concepts": 0, "images": 0}, {}
    for variant in variants:
        results[variant], v_stars[variant] = {}, []
        for f in files:
            concept, drawn = concept_and_images(cfg, variant, f, prompts, nouns, images, comps, encoders, pipe, bar,
                                                reused)
            v_stars[variant].append(concept["v_star"])
            per_prompt = {}
            for prompt, (paths, gen) in zip(prompts, drawn):
                text = noun_prompt(prompt, nouns[f])
                per_prompt[prompt] = {"identity": metric.identity(images[f], gen),
                                      "prompt": metric.prompt_similarity(gen, text),
                                      "text": text, "images": [os.path.relpath(p, cfg.out) for p in paths]}
                if judge is not None:
                    per_prompt[prompt]["judge"] = judge.scores(f, prompt, gen)
            results[variant][os.path.splitext(f)[0]] = {
                "noun": nouns[f], "token": concept["token"], "prompts": per_prompt,
                "nearest_words": concept.get("nearest_words") or [[concept["token"], None]],
                "tune_s": concept["tuning"]["seconds"],
                **tuning_record(concept["tuning"]),
                "identity": sum(r["identity"] for r in per_prompt.values()) / len(per_prompt),
                "prompt": sum(r["prompt"] for r in per_prompt.values()) / len(per_prompt)}
    return results, reused, {k: torch.stack(v) for k, v in v_stars.items()}


def load_inputs(cfg: Config):
    """Checked inputs, before anything heavy: (files, variants, prompts, {file: noun}, {file: PIL image},
    preset)."""
    files, variants, prompts = check_inputs(cfg)
    nouns = data_lib.class_nouns(cfg.images, files)
    images = {}
    for f in files:
        try:
            images[f] = data_lib.load_image(os.path.join(cfg.images, f))
        except data_lib.BadImage as e:
            raise UserError(str(e)) from None
    _, preset = tune.load_encoder_checkpoint(tune.Config(encoder=cfg.encoder, preset=cfg.preset, base=cfg.base,
                                                         clip=cfg.clip), prog="evaluate.py")
    return files, variants, prompts, nouns, images, preset


def load_generators(cfg: Config, variants, preset: str, device):
    """Frozen parts set up exactly as tune.py sets them up, the encoders, the sampling pipeline:
    (comps, encoders, pipe)."""
    comps, names = tune.load_models(preset, device, cfg.base, cfg.clip)
    encoders = load_encoders(cfg, variants, comps, names, device)
    pipe = sample.build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)  # one bar for the whole run instead
    return comps, encoders, pipe


# ----------------------------------------------------------------------------------------
# --jobs N on a CPU: N worker processes, one thread each, tune and draw; the main pass scores.
# The toy models are so small that one process keeps a second thread only partly busy, so two
# one-thread processes finish sooner than one two-thread process. Each (variant, concept) is
# tuned and drawn by one worker exactly as the main pass would, and written to --out; the main
# pass then finds every concept and image there (the cache a re-run uses) and only scores.

class _QueueBar:
    """What concept_and_images needs of a progress bar, in a worker: counts go to the main process."""

    def __init__(self, progress):
        self.progress = progress

    def set_description(self, text: str):
        pass

    def update(self, n: int):
        self.progress.put(("images", n))


def _worker(cfg: Config, items, progress, errors):
    """One worker process: take (variant, file) items until None, tune and draw each."""
    torch.set_num_threads(1)
    sys.stderr = open(os.devnull, "w")  # tuning bars and warnings of N workers would garble the one bar
    reused = {"concepts": 0, "images": 0}
    try:
        files, variants, prompts, nouns, images, preset = load_inputs(cfg)
        comps, encoders, pipe = load_generators(cfg, variants, preset, torch.device("cpu"))
        bar = _QueueBar(progress)
        while (item := items.get()) is not None:
            variant, f = item
            concept_and_images(cfg, variant, f, prompts, nouns, images, comps, encoders, pipe, bar, reused)
    except (UserError, model.WeightsUnavailable) as e:
        errors.put(("user", str(e)))
    except KeyboardInterrupt:
        pass
    except BaseException:  # a bug: its traceback goes to the main process, which prints it
        import traceback

        errors.put(("bug", traceback.format_exc()))
    progress.put(("reused", reused))


def draw_in_workers(cfg: Config, variants, files, prompts) -> dict:
    """Tune and draw every (variant, concept) in cfg.jobs one-thread worker processes (see above).
    Returns what they reused from an earlier run, {"concepts": n, "images": n}."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with this one
    items, progress, errors = ctx.Queue(), ctx.Queue(), ctx.Queue()
    # The baselines' long tunings first, so that the short items even out the workers' ends.
    for item in sorted(((v, f) for v in variants for f in files), key=lambda it: it[0] not in BASELINES):
        items.put(item)
    for _ in range(cfg.jobs):
        items.put(None)
    procs = [ctx.Process(target=_worker, args=(cfg, items, progress, errors), daemon=True) for _ in range(cfg.jobs)]
    for p in procs:
        p.start()
    reused, reports = {"concepts": 0, "images": 0}, 0
    bar = tqdm(total=len(variants) * len(files) * len(prompts) * cfg.num_images, unit="image", dynamic_ncols=True,
               desc=f"tuning and drawing in {cfg.jobs} processes")
    try:
        while reports < len(procs):  # each worker reports its reuse last, whatever happened
            try:
                kind, value = progress.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # a worker was killed (out of memory?) before it could report
                continue
            if kind == "images":
                bar.update(value)
            else:
                reports += 1
                reused = {k: reused[k] + value[k] for k in reused}
    finally:
        bar.close()
    for p in procs:
        p.join()
    failures = []
    while True:
        try:
            failures.append(errors.get(timeout=0.1))
        except queue.Empty:
            break
    for kind, text in failures:
        if kind == "bug":
            print(text, file=sys.stderr)
            raise RuntimeError("evaluate.py: a worker process failed (its traceback is above)")
    if failures:
        raise UserError(failures[0][1])
    codes = [p.exitcode for p in procs if p.exitcode != 0]
    if codes:
        raise UserError(f"a worker process ended with exit code {codes[0]} (out of memory?); "
                        f"a re-run with the same --out reuses everything that was finished")
    return reused


def main(cfg: Config):
    # 1) Inputs, before anything heavy.
    files, variants, prompts, nouns, images, preset = load_inputs(cfg)
    device = cmdline.resolve_device(cfg.device)
    if cfg.jobs > 1 and device.type != "cpu":
        raise UserError(f"--jobs {cfg.jobs} is for the CPU (one-thread worker processes); on {device} use --jobs 1")
    os.makedirs(cfg.out, exist_ok=True)
    worker_reuse = None
    if cfg.jobs > 1:
        worker_reuse = draw_in_workers(cfg, variants, files, prompts)
        cfg = dataclasses.replace(cfg, fresh=False)  # the workers' concepts and images are the fresh ones

    # 2) Models: frozen parts set up exactly as tune.py sets them up, encoders, pipeline, metric CLIP.
    comps, encoders, pipe = load_generators(cfg, variants, preset, device)
    metric = ClipMetric(preset, device, cfg.eval_clip)
    judge = open_judge(cfg, preset, comps.base, files)

    # 3) Concepts, images, scores. Everything finished is on disk and reused on a re-run.
    # The bar counts generated images (its estimate is in images); tuning shows in its label.
    bar = tqdm(total=len(variants) * len(files) * len(prompts) * cfg.num_images, unit="image", dynamic_ncols=True,
               desc="evaluate" if worker_reuse is None else "scoring")
    try:
        results, reused, v_stars = run_variants(cfg, variants, files, prompts, nouns, images, comps, encoders, pipe,
                                                metric, bar, judge)
    finally:
        bar.close()  # before any message, also on Ctrl-C
    if worker_reuse is not None:
        reused = worker_reuse  # (the main pass found everything the workers wrote)

    # 4) Summaries (mean and standard error over concept x prompt cells; tuning time over
    #    concepts), what the concepts' v* read as, table, plot.
    summary = {}
    for variant, concepts in results.items():
        cells = [r for c in concepts.values() for r in c["prompts"].values()]
        summary[variant] = {"identity": cmdline.mean_se([r["identity"] for r in cells]),
                            "prompt": cmdline.mean_se([r["prompt"] for r in cells]),
                            "tune_s": cmdline.mean_se([c["tune_s"] for c in concepts.values()]),
                            **v_star_summary(concepts, v_stars[variant])}
        if judge is not None:
            summary[variant]["judge"] = {f: cmdline.mean_se([r["judge"][f] for r in cells if f in r["judge"]])
                                         for f in Judge.CONCEPT + Judge.PROMPT
                                         if any(f in r["judge"] for r in cells)}
    for variant, d in paired_with_full(results, judged_fields(summary)).items():
        summary[variant]["vs_full"] = d
    report = {"preset": preset, "encoder": cfg.encoder, "config": dataclasses.asdict(cfg), "prompts": prompts,
              "metric_model": {"sd15": "ViT-B-16/" + cfg.eval_clip + " (QuickGELU)",
                               "sd15-arch": "ViT-B-16/random (QuickGELU)",
                               "toy": model.TOY_METRIC_CLIP if cfg.eval_clip == "openai" else cfg.eval_clip,
                               }.get(preset, "tiny-random"),
              "summary": summary, "variants": results, "reused": reused}
    write_text(os.path.join(cfg.out, "metrics.json"), json.dumps(report, indent=2))
    write_text(os.path.join(cfg.out, "metrics.md"),
               markdown_table(summary, len(files), len(prompts), cfg.num_images, prompts))
    plot_tradeoff(summary, os.path.join(cfg.out, "tradeoff.png"))
    image_grid(results, images, files, prompts, cfg.out, os.path.join(cfg.out, "grid.png"))
    print(markdown_table(summary, len(files), len(prompts), cfg.num_images))
    print(f"wrote {cfg.out}/metrics.json, metrics.md, tradeoff.png, grid.png and images/", file=sys.stderr)
    return report


def cli(argv=None) -> int:
    return cmdline.run_cli("evaluate.py", main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
