"""
model.py -- the frozen parts, the trainable tuning-encoder, prompts with a soft token.

Implements Sec. 4 of "Domain-Agnostic Tuning-Encoder for Fast Personalization of
Text-To-Image Models" (Arar, Gal et al. 2023):
    Sec. 4.1   the tuning-encoder: CLIP ViT-H-14 + UNet-encoder features -> conv fusion ->
               token embedder (v*) + LoRA hypernetwork (Eq. 2), and its checkpoint
    Sec. 4.2   nearest real tokens of v* (used by Eq. 3 in losses.py)
    Sec. 4.3   prompts with the soft token v* and the hard token v_h; the dual-path
               denoising step (Eq. 5, with the processors of dualpath.py)
    Sec. 4.4   the concept file a tuning run writes (v*, A, B per layer, alpha)
and the frozen parts they sit on: presets, SD 1.5's tokenizer and noise schedule, loading.

Presets
    sd15       real SD 1.5 + open_clip ViT-H-14 weights (needs the weights, a GPU for speed)
    sd15-arch  the same architectures with random weights (benchmarks; build on "meta" in tests)
    tiny       the same classes at toy widths, seeded random weights (tests, offline smoke runs)
    toy        the toy world's trained models (toyworld.py), loaded like sd15 from folders

This file is a library; it has no command line (the scripts' shared plumbing is in cmdline.py).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass, field

# diffusers, transformers, open_clip and matplotlib are imported inside the functions that use them:
# importing them takes 5-10 s, and --help and one-line input errors should answer at once.
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import dualpath

# The CLIP BPE vocabulary shared by SD 1.5 and all three presets (49,408 tokens).
BOS_ID, EOS_ID = 49406, 49407
SPECIAL_IDS = (BOS_ID, EOS_ID)
MAX_TOKENS = 77  # SD 1.5's text context length
PLACEHOLDER = "S*"

# open_clip's image normalisation for its CLIP towers (OpenAI mean/std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CLIP = ("ViT-H-14", "laion2b_s32b_b79k")
# The toy world's base models (toyworld.py writes them): a diffusers SD folder and open_clip folders.
TOY_BASE, TOY_CLIP, TOY_METRIC_CLIP = "runs/toyworld/sd", "runs/toyworld/clip-h", "runs/toyworld/clip-b"
PRESETS = ("sd15", "sd15-arch", "tiny", "toy")
WEIGHTS_PRESETS = ("sd15", "toy")  # presets whose weights are loaded (from --base / --clip), not built


# ----------------------------------------------------------------------------------------
# Presets


@dataclass
class PresetConfig:
    """Sizes that differ between presets. Everything else is the same code."""

    name: str
    resolution: int  # VAE view size in pixels (512 for SD 1.5)
    clip_size: int = 224  # CLIP view size in pixels
    token_dim: int = 768  # text-encoder width = size of v*
    # Tuning-encoder widths (Sec. 4.1; the paper does not give them, these are ours).
    fusion_width: int = 512  # channels of the conv fusion net
    feature_dim: int = 1024  # size of the pooled feature h shared by both heads
    layer_code_dim: int = 64  # per-layer code of the hypernetwork head
    lora_rank: int = 4  # r of Eq. (2)
    lora_scale: float = 1.0  # constant scale of Delta W = s * A B (Sec. 4.1, following LoRA)


PRESET_CONFIGS = {
    "sd15": PresetConfig("sd15", resolution=512),
    "sd15-arch": PresetConfig("sd15-arch", resolution=512),
    "tiny": PresetConfig(
        "tiny", resolution=32, token_dim=32, fusion_width=32, feature_dim=64, layer_code_dim=16, lora_rank=2
    ),
    # toyworld.py's trained models: 32 px pictures, a 64-wide text encoder, 32 px CLIPs.
    "toy": PresetConfig(
        "toy", resolution=32, clip_size=32, token_dim=64, fusion_width=64, feature_dim=128, layer_code_dim=16,
        lora_rank=4
    ),
}


def weights_for(preset: str, base: str | None, clip: str | None) -> tuple[str, str]:
    """(base, clip) a preset loads: the given ones, or the preset's own default where the
    caller passed SD 1.5's (the scripts' defaults). "" for the presets built with random weights."""
    if preset not in WEIGHTS_PRESETS:
        return "", ""
    if preset == "toy":
        base = TOY_BASE if base in (None, SD15_BASE) else base
        clip = TOY_CLIP if clip in (None, SD15_CLIP[1]) else clip
    return base or SD15_BASE, clip or SD15_CLIP[1]


def preset_config(preset: str) -> PresetConfig:
    if preset not in PRESET_CONFIGS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESET_CONFIGS[preset]


@functools.lru_cache(maxsize=1)
def build_tokenizer():
    """SD 1.5's CLIPTokenizer, built offline from the BPE file that open_clip ships.

    open_clip's SimpleTokenizer holds the same 49,408-token vocabulary and merges as SD 1.5's
    tokenizer; only the two special tokens are spelt differently. Ids equal SD 1.5's.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in st.encoder.items()}
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.model_max_length = MAX_TOKENS
    assert len(tok) == 49408 and tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    return tok


# SD 1.5's sampler settings that must never come from whatever scheduler file a --base folder
# holds: diffusers' default for a missing key is clip_sample=True, which clamps every latent to
# [-1, 1] and ruins the images (SD latents are not in [-1, 1]).
SD15_SAMPLER_SETTINGS = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, thresholding=False)
_DDPM_SETTINGS = {k: v for k, v in SD15_SAMPLER_SETTINGS.items() if k != "set_alpha_to_one"}  # DDPM has no such key


def sd15_scheduler_config() -> dict:
    """SD 1.5's noise schedule (scaled-linear betas, epsilon prediction)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        **_DDPM_SETTINGS,
    )


def load_noise_scheduler(base: str):
    """The training scheduler (DDPM) of a --base folder or hub id: its betas and prediction type
    from the file, the sampler settings forced to SD 1.5's (SD15_SAMPLER_SETTINGS)."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(base, subfolder="scheduler")
    return DDPMScheduler.from_config(config, **_DDPM_SETTINGS)


def sampling_scheduler(noise_scheduler):
    """DDIM for sampling, from the training schedule, with SD 1.5's sampler settings set
    explicitly (never inherited from a file)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config, **SD15_SAMPLER_SETTINGS)


def uses_quick_gelu(arch: str, pretrained: str | None, file_quick_gelu: bool) -> bool:
    """Whether CLIP weights `pretrained` (an open_clip tag, or a local file) need QuickGELU.

    OpenAI's CLIPs were trained with QuickGELU (x * sigmoid(1.702 x)), LAION's with nn.GELU.
    open_clip builds "ViT-B-16" with nn.GELU and only *warns* when OpenAI weights are loaded
    into it, so every feature would come from the wrong network. The tag's own record says
    which it is; for a local file the caller says what the file is meant to hold.
    """
    import open_clip

    if pretrained and os.path.isfile(pretrained):
        return file_quick_gelu
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    return bool((tag_cfg or {}).get("quick_gelu", False))


def open_clip_model(arch: str, pretrained: str | None, device, file_quick_gelu: bool, quick_gelu: bool | None = None):
    """An open_clip CLIP with the activation its weights were trained with (see uses_quick_gelu).

    pretrained: an open_clip tag for `arch`, a local weights file for `arch`, or a folder that
    open_clip loads whole (open_clip_config.json + weights, whose config names the activation).
    """
    import open_clip

    if pretrained and os.path.isdir(pretrained):
        return open_clip.create_model("local-dir:" + pretrained, device=device)
    if quick_gelu is None:
        quick_gelu = uses_quick_gelu(arch, pretrained, file_quick_gelu)
    return open_clip.create_model(arch, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)


class WeightsUnavailable(Exception):
    """Weights that cannot be loaded; the message is one line that says what to do."""


class _weights_error:
    """Turn a failure to load weights into one line that says what, from where, and what to do."""

    def __init__(self, preset: str, flag: str, where: str):
        self.preset, self.flag, self.where = preset, flag, where

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, Exception) or isinstance(err, WeightsUnavailable):
            return False
        reason = (str(err).strip().splitlines() or [kind.__name__])[0][:160]
        what = {"--base": "the UNet / VAE / text encoder", "--clip": "the CLIP image encoder"}[self.flag]
        copy = "a diffusers SD 1.5 folder" if self.flag == "--base" else "an open_clip ViT-H-14 file"
        hint = ("run toyworld.py first, or pass the folders it wrote" if self.preset == "toy" else
                f"pass {self.flag} with a local copy ({copy}), "
                f"check the network, or use --preset tiny for the offline smoke run")
        raise WeightsUnavailable(f"cannot load {what} of preset {self.preset} from {self.flag} {self.where} "
                        f"({kind.__name__}: {reason}); {hint}") from None


@dataclass
class Components:
    """The frozen parts of one preset, plus what describes them."""

    preset: str
    cfg: PresetConfig
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    image_encoder: nn.Module | None  # open_clip VisionTransformer (output_tokens=True)
    noise_scheduler: object  # DDPMScheduler (training); sample.py derives a DDIMScheduler from it
    base: str = ""  # where sd15 weights came from (hub id or folder); "" for random presets
    clip: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def token_table(self) -> torch.Tensor:
        """The frozen token-embedding table of the text encoder, (49408, token_dim)."""
        return self.text_encoder.get_input_embeddings().weight


def _sd15_unet_kwargs() -> dict:
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def _sd15_vae_kwargs() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )


def _text_config(width: int = 768, mlp: int = 3072, layers: int = 12, heads: int = 12):
    """CLIP text encoder config; the defaults are SD 1.5's (OpenAI CLIP ViT-L/14 text tower)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=width,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,
    )


def _build_random(preset: str, device, with_image_encoder: bool = True) -> dict:
    """Build the architectures with random weights (sd15-arch, tiny)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPTextModel

    if preset == "sd15-arch":
        with torch.device(device):
            unet = UNet2DConditionModel(**_sd15_unet_kwargs())
            vae = AutoencoderKL(**_sd15_vae_kwargs())
            text_encoder = CLIPTextModel(_text_config())
            # ViT-H-14's vision tower (open_clip config: width 1280, 32 layers, head width 80,
            # patch 14, embed dim 1024). Built directly: open_clip.create_model("ViT-H-14",
            # device="meta") also builds the text tower and takes ~15 s on 2 cores.
            image_encoder = VisionTransformer(
                image_size=224, patch_size=14, width=1280, layers=32, heads=16, mlp_ratio=4.0, output_dim=1024
            ) if with_image_encoder else None
        return dict(unet=unet, vae=vae, text_encoder=text_encoder, image_encoder=image_encoder)

    assert preset == "tiny"
    # Toy widths, same classes. Seeded so that every process builds the same weights,
    # without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=32,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(_text_config(width=32, mlp=64, layers=2, heads=4))
        # Built even when not wanted, so that the seeded weights never depend on the flag.
        image_encoder = VisionTransformer(
            image_size=224, patch_size=32, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=32
        )
    image_encoder = image_encoder if with_image_encoder else None
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, image_encoder=image_encoder)


def load_components(
    preset: str = "sd15",
    device="cpu",
    dtype: torch.dtype = torch.float32,
    base: str = SD15_BASE,
    clip: str = SD15_CLIP[1],
    with_image_encoder: bool = True,
) -> Components:
    """Load (sd15) or build (sd15-arch, tiny) the frozen parts, all in eval mode, no grads.

    base: SD 1.5 hub id or local folder (sd15 only); clip: open_clip pretrained tag or a local
    checkpoint file for ViT-H-14 (sd15 only). with_image_encoder=False skips the CLIP tower
    (sample.py does not need it).
    """
    from diffusers import DDPMScheduler

    cfg = preset_config(preset)
    base, clip = weights_for(preset, base, clip)
    if preset in WEIGHTS_PRESETS:
        # Real weights: SD 1.5 (hub id or folder), or the toy world's folders, through the same lines.
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        with _weights_error(preset, "--base", base):
            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
            scheduler = load_noise_scheduler(base)
        image_encoder = None
        if with_image_encoder:
            # laion2b_s32b_b79k was trained with nn.GELU; a local file is taken to hold those weights
            # (a folder -- the toy world's -- carries its own architecture and activation).
            with _weights_error(preset, "--clip", clip):
                image_encoder = open_clip_model(SD15_CLIP[0], clip, device, file_quick_gelu=False).visual
        parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, image_encoder=image_encoder)
    else:
        parts = _build_random(preset, device, with_image_encoder)
        tokenizer = build_tokenizer()
        scheduler = DDPMScheduler(**sd15_scheduler_config())

    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # diffusers warns on every .to(dtype) of a model not from_pretrained
    try:
        for m in parts.values():
            if m is None:
                continue
            m.requires_grad_(False).eval()
            if str(device) != "meta":
                m.to(device=device, dtype=dtype)
    finally:
        dlogging.set_verbosity(verbosity)
    if parts["image_encoder"] is not None:
        parts["image_encoder"].output_tokens = True  # forward -> (pooled, patch tokens)
    return Components(preset=preset, cfg=cfg, tokenizer=tokenizer, noise_scheduler=scheduler, base=base, clip=clip,
                      **parts)


# ----------------------------------------------------------------------------------------
# Prompts with a soft token (Sec. 3.1: "a photo of S*" -> v* at the position of S*)


@functools.lru_cache(maxsize=4096)
def tokenize_ids(tokenizer, piece: str) -> tuple[int, ...]:
    """Token ids of a piece of prompt text, no special tokens (cached: templates repeat)."""
    # verbose=False: transformers would warn about "indexing errors" for a long piece; the
    # caller says what really happens to a long prompt (tokenize_with_placeholder).
    return tuple(tokenizer(piece, add_special_tokens=False, verbose=False).input_ids)


def tokenize_with_placeholder(tokenizer, prompts: list[str], placeholder: str = PLACEHOLDER):
    """Token ids (N, 77) and a mask (N, 77) of where the placeholder sits.

    Each piece of the prompt between placeholders is tokenised on its own, so the placeholder
    occupies exactly one token slot (whatever the tokenizer would have made of "S*"). The slot
    holds id 0 until the caller replaces it (hard prompt) or its embedding (soft prompt).
    """
    ids = torch.full((len(prompts), MAX_TOKENS), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), MAX_TOKENS), dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        row, slots = [BOS_ID], []
        pieces = prompt.split(placeholder)
        for j, piece in enumerate(pieces):
            row += tokenize_ids(tokenizer, piece)
            if j < len(pieces) - 1:
                slots.append(len(row))
                row.append(0)
        if any(s >= MAX_TOKENS - 1 for s in slots):
            raise PromptTooLong(f"the prompt is too long: {placeholder} is token {max(slots)} of {len(row) - 1}, "
                                f"but SD 1.5 reads {MAX_TOKENS - 2} tokens, so it would be cut off: {prompt[:60]!r}...")
        if len(row) > MAX_TOKENS - 1:
            warnings.warn(f"the prompt has {len(row) - 1} tokens; SD 1.5 reads {MAX_TOKENS - 2}, so the text after "
                          f"token {MAX_TOKENS - 2} is cut off: {prompt!r}")
        row = row[: MAX_TOKENS - 1] + [EOS_ID]  # truncate like the pipeline does
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, slots] = True
    return ids, mask


class PromptTooLong(ValueError):
    """A prompt whose placeholder falls beyond the 75 tokens the text encoder reads."""


def encode_prompt(
    text_encoder,
    tokenizer,
    prompts: list[str],
    v_star: torch.Tensor | None = None,
    hard_ids: torch.Tensor | None = None,
    placeholder: str = PLACEHOLDER,
) -> torch.Tensor:
    """Text-encoder output (N, 77, D) for prompts that contain the placeholder.

    v_star (N|1, D): the soft prompt C -- v* is inserted at the placeholder's token slot
    (gradients flow back to v*). hard_ids (N|1,): the hard prompt C_h -- the placeholder is
    replaced by a real token id (Sec. 4.3). Neither: the placeholder slot keeps id 0.
    Works with the unmodified transformers CLIPTextModel: v* enters through a forward hook on
    its token-embedding layer.
    """
    device = text_encoder.get_input_embeddings().weight.device
    ids, mask = tokenize_with_placeholder(tokenizer, prompts, placeholder)
    ids, mask = ids.to(device), mask.to(device)
    if hard_ids is not None:
        ids = torch.where(mask, hard_ids.to(device).view(-1, 1), ids)
    if v_star is None:
        return text_encoder(input_ids=ids).last_hidden_state  # (N, 77, D)

    def insert_v_star(module, inputs, out):  # out: (N, 77, D) token embeddings
        return torch.where(mask[..., None], v_star[:, None, :].to(out.dtype), out)

    handle = text_encoder.get_input_embeddings().register_forward_hook(insert_v_star)
    try:
        return text_encoder(input_ids=ids).last_hidden_state  # (N, 77, D)
    finally:
        handle.remove()


def encode_soft_and_hard(text_encoder, tokenizer, prompts: list[str], v_star: torch.Tensor, token_table: torch.Tensor,
                         placeholder: str = PLACEHOLDER, hard_ids: torch.Tensor | None = None):
    """(C, C_h, hard_ids) for Eq. (5): C with v* at the placeholder (gradients reach v*), C_h with
    the nearest real token v_h of each v* instead (Sec. 4.3; no gradient). v_star (N|1, D).
    hard_ids (N|1,), if given, are the v_h to use (tuning keeps the encoder prediction's, see tune.py)."""
    if hard_ids is None:
        hard_ids = nearest_tokens(v_star, token_table, k=1)[0][:, 0]  # (N|1,) ids of v_h
    C = encode_prompt(text_encoder, tokenizer, prompts, v_star=v_star, placeholder=placeholder)  # (N, 77, D)
    with torch.no_grad():
        C_h = encode_prompt(text_encoder, tokenizer, prompts, hard_ids=hard_ids, placeholder=placeholder)
    return C, C_h, hard_ids


@torch.no_grad()
def nearest_tokens(v: torch.Tensor, token_table: torch.Tensor, k: int = 1, exclude=SPECIAL_IDS):
    """Cosine top-k rows of the token table for each v (N, D) -> (ids (N, k), cosines (N, k)).

    Only words are returned: never the special tokens (start/end of text), and never a row of
    zeros -- a row the text encoder was never trained on carries no meaning, and a model that
    leaves such rows in its table marks them by zeroing them (SD 1.5's CLIP trained every row, so
    this excludes nothing there). No gradient flows through the search.
    """
    table = token_table.detach().float()
    sims = F.normalize(v.detach().float(), dim=-1) @ F.normalize(table, dim=-1).T  # (N, V)
    sims[:, list(exclude)] = -float("inf")
    sims[:, ~word_rows(table)] = -float("inf")  # a row of zeros is no word
    cos, ids = sims.topk(k, dim=-1)
    return ids, cos


def word_rows(token_table: torch.Tensor) -> torch.Tensor:
    """(V,) bool: the rows of the token table that are words, i.e. not all zeros."""
    return token_table.detach().ne(0).any(dim=-1)


def token_word(tokenizer, token_id: int) -> str:
    """The word a token id stands for, without CLIP's end-of-word mark ("star</w>" -> "star")."""
    return tokenizer.convert_ids_to_tokens(int(token_id)).replace("</w>", "")


def nearest_words(tokenizer, token_table: torch.Tensor, v: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """v (N, D) -> for each row, its k nearest words and their cosines, e.g. [("star", 0.91), ...]
    (what v* "reads as", Sec. 4.2; a batch of v* that all read as the same word has collapsed)."""
    return named_tokens(tokenizer, *nearest_tokens(v, token_table, k=k))


def named_tokens(tokenizer, ids: torch.Tensor, cos: torch.Tensor) -> list[list[tuple[str, float]]]:
    """nearest_tokens' (ids, cosines), each (N, k) -> per row [(word, cosine rounded to 3), ...]."""
    return [[(token_word(tokenizer, i), round(float(c), 3))
             for i, c in zip(row_ids, row_cos)] for row_ids, row_cos in zip(ids, cos)]


def mean_pairwise_cosine(v: torch.Tensor) -> float | None:
    """The mean cosine between two different rows of v (N, D): near 1 when every image got the same
    v* (Sec. 5.2's mode collapse). None for fewer than two rows."""
    n = len(v)
    if n < 2:
        return None
    vn = F.normalize(v.detach().float(), dim=-1)
    return ((vn @ vn.T).sum().item() - n) / (n * (n - 1))  # off-diagonal mean


# ----------------------------------------------------------------------------------------
# Frozen feature backbones (Sec. 4.1: "spatial features ... from each backbone's last layer")


@torch.no_grad()
def clip_spatial_features(image_encoder, clip_image: torch.Tensor) -> torch.Tensor:
    """open_clip ViT last-layer patch tokens as a map: (N, 3, 224, 224) -> (N, W, g, g)."""
    _, tokens = image_encoder(clip_image.to(next(image_encoder.parameters()).dtype))  # (N, g*g, W)
    return rearrange(tokens, "b (h w) c -> b c h w", h=math.isqrt(tokens.shape[1]))  # (N, W, g, g)


@torch.no_grad()
def unet_encoder_features(unet, z_t: torch.Tensor, t: torch.Tensor, empty_emb: torch.Tensor) -> torch.Tensor:
    """Down blocks + mid block of the base UNet on (z_t, t) with the empty prompt (Sec. 4.1).

    (N, 4, 64, 64) -> (N, 1280, 8, 8) for SD 1.5. No LoRA: the dual-path processors act as
    plain attention when they are given no per-call inputs.
    """
    dtype = next(unet.parameters()).dtype
    z_t = z_t.to(dtype)
    ctx = empty_emb.to(dtype).expand(z_t.shape[0], -1, -1)  # (N, 77, D)
    t = t.expand(z_t.shape[0]) if t.dim() == 1 and t.shape[0] == 1 else t
    emb = unet.time_embedding(unet.time_proj(t).to(dtype))  # (N, time_dim)
    h = unet.conv_in(z_t)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(h, temb=emb, encoder_hidden_states=ctx)
        else:
            h, _ = block(h, temb=emb)
    return unet.mid_block(h, emb, encoder_hidden_states=ctx)


# ----------------------------------------------------------------------------------------
# The tuning-encoder (Sec. 4.1, Fig. 2)


def lora_shapes(unet, names: list[str]) -> list[tuple[int, int]]:
    """(D_in, D_out) of each LoRA'd projection, in the order of `names`."""
    mods = dict(unet.named_modules())
    return [(mods[n].in_features, mods[n].out_features) for n in names]


class ConvBlock(nn.Module):
    """Residual 3x3 conv block: GroupNorm -> SiLU -> conv, twice."""

    def __init__(self, width: int):
        super().__init__()
        groups = min(32, width // 4)
        self.net = nn.Sequential(
            nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x):
        return x + self.net(x)


class TuningEncoder(nn.Module):
    """Trainable part of the encoder: conv fusion + token embedder + hypernetwork (Sec. 4.1).

    forward(clip_map, unet_map) takes the two frozen backbones' last-layer maps
    (see clip_spatial_features / unet_encoder_features, or `encode` below which runs them) and
    returns
        v      (N, token_dim)                   the word embedding v* (token embedder head)
        lora   {name: (A (N, D_in, r), B (N, r, D_out))} for each q/k/v projection (Eq. 2)
    The frozen backbones are not submodules, so state_dict(), the optimizer and DDP only ever
    see trainable weights.
    """

    def __init__(self, cfg: PresetConfig, clip_channels: int, unet_channels: int,
                 layer_names: list[str], layer_shapes: list[tuple[int, int]], hypernet: bool = True,
                 token_norm: float | None = None):
        super().__init__()
        w, d, c, r = cfg.fusion_width, cfg.feature_dim, cfg.layer_code_dim, cfg.lora_rank
        self.layer_names = list(layer_names)
        self.layer_shapes = [tuple(s) for s in layer_shapes]
        self.rank, self.lora_scale = r, cfg.lora_scale
        # hypernet=False: the Sec. 5.4 ablation "omitting the hyper-network at training time" --
        # the token head alone; forward returns an empty LoRA dict.
        self.hypernet = hypernet

        # Fusion: project both maps to a common width, resize to one grid, concat, convs, pool.
        self.clip_proj = nn.Conv2d(clip_channels, w, 1)
        self.unet_proj = nn.Conv2d(unet_channels, w, 1)
        self.fuse_in = nn.Conv2d(2 * w, w, 3, padding=1)
        self.fuse_blocks = nn.Sequential(ConvBlock(w), ConvBlock(w))
        self.to_feature = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d), nn.SiLU())  # after global pooling

        # Token-embedder head -> v*.
        self.token_head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, cfg.token_dim))

        if token_norm is not None:
            self._start_v_at_norm(token_norm)

        if not hypernet:
            return
        # Hypernetwork head: h -> one code per layer -> per-layer projections to A and B.
        n = len(self.layer_names)
        self.layer_codes = nn.Linear(d, n * c)
        self.layer_embed = nn.Parameter(torch.randn(n, c) * 0.02)
        self.code_norm = nn.LayerNorm(c)
        self.a_heads = nn.ModuleList(nn.Linear(c, din * r) for din, _ in self.layer_shapes)
        self.b_heads = nn.ModuleList(nn.Linear(c, r * dout) for _, dout in self.layer_shapes)
        for (din, _), a in zip(self.layer_shapes, self.a_heads):
            # A entries ~ N(0, 1/D_in) for a unit-norm code, so x·A stays O(1) like LoRA's A.
            nn.init.normal_(a.weight, std=1.0 / math.sqrt(c * din))
            nn.init.zeros_(a.bias)
        for b in self.b_heads:
            # Sec. 4.1: "we initialize the prediction layer of the matrix B to zero" -> Delta W = 0.
            nn.init.zeros_(b.weight)
            nn.init.zeros_(b.bias)

    @torch.no_grad()
    def _start_v_at_norm(self, target: float, probes: int = 512):
        """Scale the token head's last layer so that ||v*|| starts at `target` (a real token's norm).

        Untrained, the head gives ||v*|| ~ 1.56 at SD 1.5 sizes whatever the image, about 4x a
        real token; Eq. (3) works on cosines, so only the small Eq. (4) term would pull it back,
        and training would start in the out-of-distribution region Sec. 4.2 warns about. The
        LayerNorm in `to_feature` makes h's distribution (almost) independent of the input, so
        random unit-variance probes measure the starting norm; a fixed generator keeps it seeded.
        """
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(probes, self.to_feature[0].normalized_shape[0], generator=g)
        norm = self.token_head(self.to_feature(probe)).norm(dim=-1).mean()
        last = self.token_head[-1]
        last.weight.mul_(target / norm)
        last.bias.mul_(target / norm)

    def forward(self, clip_map: torch.Tensor, unet_map: torch.Tensor):
        p = next(self.parameters())
        clip_map, unet_map = clip_map.to(p.dtype), unet_map.to(p.dtype)
        x_u = self.unet_proj(unet_map)  # (N, w, 8, 8)
        x_c = F.interpolate(self.clip_proj(clip_map), size=x_u.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse_blocks(self.fuse_in(torch.cat([x_c, x_u], dim=1)))  # (N, w, 8, 8)
        h = self.to_feature(x.mean(dim=(2, 3)))  # global average pool -> (N, d)

        v = self.token_head(h)  # (N, token_dim)
        if not self.hypernet:
            return v, {}

        n, r = h.shape[0], self.rank
        codes = self.code_norm(self.layer_codes(h).view(n, len(self.layer_names), -1) + self.layer_embed)  # (n, L, c)
        lora = {}
        for i, (name, (din, dout)) in enumerate(zip(self.layer_names, self.layer_shapes)):
            A = self.a_heads[i](codes[:, i]).view(n, din, r)  # (n, D_in, r)
            B = self.b_heads[i](codes[:, i]).view(n, r, dout)  # (n, r, D_out)
            lora[name] = (A, B)
        return v, lora


def typical_token_norm(token_table: torch.Tensor) -> float | None:
    """Median L2 norm of the words of the token-embedding table (not the special tokens, not
    the all-zero rows that mark tokens the text encoder never learned; see nearest_tokens)."""
    if token_table.device.type == "meta":  # shapes only (tests): nothing to measure
        return None
    table = token_table.detach().float().cpu()
    keep = word_rows(table)
    keep[list(SPECIAL_IDS)] = False
    return table[keep].norm(dim=-1).median().item()


def build_encoder(comps: Components, layer_names: list[str], hypernet: bool = True) -> TuningEncoder:
    """A TuningEncoder sized for this preset's backbones (on CPU, fp32), with v* starting at
    the token table's typical norm."""
    clip_w = comps.image_encoder.transformer.width  # needs the components loaded with their image tower
    unet_w = comps.unet.config.block_out_channels[-1]
    return TuningEncoder(comps.cfg, clip_w, unet_w, layer_names, lora_shapes(comps.unet, layer_names),
                         hypernet=hypernet, token_norm=typical_token_norm(comps.token_table))


# The encoder checkpoint (pretrain.py writes it, tune.py / evaluate.py read it): the trainable
# weights only, what is needed to rebuild the encoder, and -- for resuming -- the optimiser,
# scheduler and RNG states and the run's config. Loads with torch.load(weights_only=True).
ENCODER_FORMAT = "date-encoder-v1"


def encoder_checkpoint(encoder: TuningEncoder, comps: Components, step: int, **extra) -> dict:
    """The checkpoint dict of an encoder trained on `comps` (extra: optimizer, scheduler, rng, config)."""
    return {
        "format": ENCODER_FORMAT,
        "preset": comps.preset,
        "base": comps.base,  # the UNet / text encoder it was trained with (sd15)
        "clip": comps.clip,  # the ViT-H-14 weights it was trained with (sd15)
        "step": step,
        "hypernet": encoder.hypernet,
        "encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "layer_names": list(encoder.layer_names),
        "layer_shapes": [list(s) for s in encoder.layer_shapes],
        "encoder_dims": {"clip_channels": encoder.clip_proj.in_channels,
                         "unet_channels": encoder.unet_proj.in_channels},
        **extra,
    }


def load_encoder_checkpoint(path: str) -> dict:
    """Load an encoder checkpoint (weights_only) and check that it is ours, with the keys and
    types that describe it. (check_encoder_state checks its tensors against the model.) Raises ValueError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, a truncated or corrupted one, or one holding arbitrary objects
        raise ValueError(f"{path} is not an encoder checkpoint written by pretrain.py (it does not load: "
                         f"{e.__class__.__name__})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == CONCEPT_FORMAT:
        raise ValueError(f"{path} is a concept file from tune.py, not an encoder checkpoint: pass it to "
                         f"sample.py --concept")
    if not isinstance(ckpt, dict) or ckpt.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path} is not an encoder checkpoint written by pretrain.py (no format {ENCODER_FORMAT!r})")
    check_fields(ckpt, path, "encoder checkpoint", optional=("base", "clip", "hypernet"), fields=(
        ("preset", lambda x: x in PRESETS, f"one of {', '.join(PRESETS)}"),
        ("step", lambda x: _is_int(x) and x >= 0, "an int >= 0"),
        ("hypernet", lambda x: isinstance(x, bool), "True or False"),
        ("encoder", lambda x: isinstance(x, dict) and all(isinstance(k, str) for k in x), "a dict {name: tensor}"),
        ("layer_names", lambda x: isinstance(x, list) and all(isinstance(n, str) for n in x), "a list of layer names"),
        ("layer_shapes", lambda x: isinstance(x, list) and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(d) and d > 0 for d in s) for s in x),
         "a list of [D_in, D_out] pairs"),
        ("encoder_dims", lambda x: isinstance(x, dict) and all(_is_int(x.get(k)) and x[k] > 0 for k in
                                                               ("clip_channels", "unet_channels")),
         "a dict with positive ints clip_channels and unet_channels"),
        ("base", lambda x: x is None or isinstance(x, str), "a string"),
        ("clip", lambda x: x is None or isinstance(x, str), "a string"),
    ))
    if len(ckpt["layer_shapes"]) != len(ckpt["layer_names"]):
        raise ValueError(f"{path}: {len(ckpt['layer_names'])} layer_names but {len(ckpt['layer_shapes'])} "
                         f"layer_shapes")
    return ckpt


def check_same_weights(what: str, recorded: dict, base: str, clip: str | None):
    """An encoder (or concept) is tied to the weights it was trained with: refuse others. Raises ValueError.

    recorded: a checkpoint or concept dict with "preset", "base" and (for encoders) "clip".
    Only sd15 and toy record them (the random presets have no weights to mix up). base / clip:
    what the user passed (None: not given; a preset's default is resolved as load_components does).
    """
    preset = recorded.get("preset")
    if preset not in WEIGHTS_PRESETS:
        return
    base_default, clip_default = weights_for(preset, base, clip)
    for flag, given, key in (("--base", base and base_default, "base"), ("--clip", clip and clip_default, "clip")):
        if given is None or key not in recorded:
            continue
        if _weights_id(given) != _weights_id(recorded[key]):
            raise ValueError(f"{what} was trained with {flag} {recorded[key]}, not {given}: an encoder and its "
                             f"concepts only work with the weights they were trained on (pass {flag} {recorded[key]})")


def _weights_id(where: str) -> str:
    """A hub id as it is; a local path made absolute, so that ./sd15 and /abs/sd15 compare equal."""
    return os.path.abspath(where) if os.path.exists(where) else where


def check_encoder_state(state: dict, expected: dict, path: str, what: str = "encoder"):
    """A checkpoint's tensors against those of the module they will be loaded into: the same
    names, each a floating-point tensor of the expected shape with finite, plausible values.
    Raises ValueError naming the file, the key and what was expected (load_state_dict's own
    errors are a multi-line traceback)."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        raise ValueError(f"{path}: {what} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if extra:
        raise ValueError(f"{path}: {what} holds {len(extra)} tensor(s) this model does not have, e.g. {extra[0]!r}")
    for k, want in expected.items():
        t = state[k]
        check_tensor(t, path, f"{what}[{k!r}]")
        if t.shape != want.shape:
            raise ValueError(f"{path}: {what}[{k!r}] has shape {tuple(t.shape)}, this model needs {tuple(want.shape)}")


def encoder_from_checkpoint(ckpt: dict, comps: Components, path: str = "the encoder checkpoint",
                            layer_names: list[str] | None = None) -> TuningEncoder:
    """Rebuild the trainable encoder of a (loaded) checkpoint for these components, after checking
    it against them: the preset, the backbones' widths, the LoRA layers (names and shapes, in the
    UNet's order) and every tensor. Raises ValueError (one line)."""
    if ckpt["preset"] != comps.preset:
        raise ValueError(f"the encoder checkpoint {path} is for preset {ckpt['preset']!r}, not {comps.preset!r}")
    dims = ckpt["encoder_dims"]
    have = {"clip_channels": comps.image_encoder.transformer.width,
            "unet_channels": comps.unet.config.block_out_channels[-1]}
    for k, v in have.items():
        if dims[k] != v:
            raise ValueError(f"{path}: encoder_dims {k} is {dims[k]}, this preset's backbone has {v}")
    names = layer_names if layer_names is not None else dualpath.lora_layer_names(comps.unet)
    if list(ckpt["layer_names"]) != list(names):
        bad = next((n for n in ckpt["layer_names"] if n not in names), None)
        raise ValueError(f"{path}: layer_names are not this UNet's {len(names)} LoRA layers"
                         + (f" ({bad!r} is not one of them)" if bad else f" (it lists {len(ckpt['layer_names'])})"))
    shapes = lora_shapes(comps.unet, names)
    for n, s, want in zip(names, ckpt["layer_shapes"], shapes):
        if tuple(s) != tuple(want):
            raise ValueError(f"{path}: layer_shapes gives {n} the shape {tuple(s)}, this UNet's is {tuple(want)}")
    enc = TuningEncoder(comps.cfg, dims["clip_channels"], dims["unet_channels"], list(names), shapes,
                        hypernet=ckpt.get("hypernet", True))
    check_encoder_state(ckpt["encoder"], enc.state_dict(), path)
    enc.load_state_dict(ckpt["encoder"])
    return enc


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def empty_prompt_embeds(comps: Components) -> torch.Tensor:
    """Text-encoder output of the empty prompt, (1, 77, D); cached on the components."""
    cached = comps.extras.get("empty_emb")
    if cached is None:
        with torch.no_grad():
            cached = encode_prompt(comps.text_encoder, comps.tokenizer, [""])
        comps.extras["empty_emb"] = cached
    return cached


def encode(encoder: TuningEncoder, comps: Components, clip_image, z_t, t):
    """The whole encoder E(I_c, z_t, t): frozen backbones (no_grad) then the trainable part."""
    clip_map = clip_spatial_features(comps.image_encoder, clip_image)  # (N, 1280, 16, 16)
    unet_map = unet_encoder_features(comps.unet, z_t, t, empty_prompt_embeds(comps))  # (N, 1280, 8, 8)
    return encoder(clip_map, unet_map)


# ----------------------------------------------------------------------------------------
# Small shared steps of the training losses


@torch.no_grad()
def vae_latents(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> scaled latents (N, 4, R/8, R/8), a sample of the posterior."""
    dist = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    return dist.sample(generator=generator) * vae.config.scaling_factor


def noisy_latents(scheduler, z0: torch.Tensor, generator: torch.Generator | None = None, t: torch.Tensor | None = None):
    """Forward diffusion: (z_t, t, eps, target). target = eps for SD 1.5 (Eq. 1); v for v-models."""
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator,
                          device=z0.device)
    z_t = scheduler.add_noise(z0, noise, t)
    target = scheduler.get_velocity(z0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    return z_t, t, noise, target


def frozen_dtype(device) -> torch.dtype:
    """Frozen weights: bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device):
    """Mixed precision for forward passes: on CUDA the frozen weights' own dtype (bf16, or fp16
    where bf16 is missing; see frozen_dtype), on CPU none (fp32)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = frozen_dtype(device) if cuda else torch.bfloat16  # (unused on CPU: enabled=False)
    return torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=cuda)


def dual_path_prediction(comps: Components, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str],
                         v: torch.Tensor, lora: dict, alpha: float, placeholder: str = PLACEHOLDER,
                         hard_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The personalised model's noise prediction: the step pre-training and tuning train on.

    C holds v (N|1, D) at the placeholder of each prompt, C_h its nearest real token (Sec. 4.3;
    computed only when alpha < 1), or the token ids hard_ids (N|1,) where given; the dual-path
    UNet (Eq. 5) with the per-sample LoRA `lora` (Eq. 2) predicts the noise of z_t (N, 4, h, w)
    at t (N,). Eq. (1) compares it with the target.
    """
    with autocast(z_t.device):
        if alpha < 1:  # C with v*, C_h with its nearest real token v_h, both (N, 77, D)
            C, C_h, _ = encode_soft_and_hard(comps.text_encoder, comps.tokenizer, prompts, v, comps.token_table,
                                             placeholder, hard_ids=hard_ids)
        else:  # alpha = 1 runs the soft path alone: no C_h needed
            C = encode_prompt(comps.text_encoder, comps.tokenizer, prompts, v_star=v, placeholder=placeholder)
            C_h = None
        kw = dualpath.dual_path_kwargs(lora, C_h, alpha=alpha, lora_scale=comps.cfg.lora_scale)
        return comps.unet(z_t, t, encoder_hidden_states=C, cross_attention_kwargs=kw).sample  # Eq. (5)


# ----------------------------------------------------------------------------------------
# Concept files: what tune.py writes and sample.py / evaluate.py read

CONCEPT_FORMAT = "date-concept-v1"


def make_concept(comps: Components, v: torch.Tensor, lora: dict, placeholder: str, alpha_blend: float,
                 tuning: dict, step_losses: list[float], token_id: int | None = None) -> dict:
    """The concept file's content: everything sample.py needs, a few MB at most, never a UNet.

    v (1, D) the tuned word embedding v*; lora {module path: (A (1, D_in, r), B (1, r, D_out))}
    (may be empty: textual inversion has no LoRA); tuning: the settings that made it; token_id:
    the hard token v_h of C_h (default: v*'s nearest real token; tune.py passes the encoder's).
    Keys: format, placeholder, v_star (D,), token_id / token (the hard token, for C_h),
    nearest_words (v*'s five nearest words with their cosines), lora_A / lora_B ({module path:
    (D_in, r) / (r, D_out)}), rank, lora_scale, alpha_blend, preset, base, layer_names, tuning,
    first_loss, final_loss. Loads with weights_only=True.
    """
    v = v.detach().float()
    ids, cos = nearest_tokens(v, comps.token_table, k=5)  # one search: v*'s five nearest words
    if token_id is None:  # the hard token: v*'s own nearest word
        token_id = int(ids[0, 0])
    words = named_tokens(comps.tokenizer, ids, cos)[0]
    return {
        "format": CONCEPT_FORMAT,
        "placeholder": placeholder,
        "v_star": v[0].cpu(),
        "token_id": token_id,
        "token": token_word(comps.tokenizer, token_id),
        "nearest_words": [[w, c] for w, c in words],  # v*'s five nearest words and cosines (what it reads as)
        "lora_A": {k: A.detach()[0].cpu().float().contiguous() for k, (A, _) in lora.items()},
        "lora_B": {k: B.detach()[0].cpu().float().contiguous() for k, (_, B) in lora.items()},
        "rank": comps.cfg.lora_rank,
        "lora_scale": comps.cfg.lora_scale,
        "alpha_blend": float(alpha_blend),
        "preset": comps.preset,
        "base": comps.base,
        "layer_names": list(lora),
        "tuning": dict(tuning),
        "first_loss": step_losses[0] if step_losses else None,
        "final_loss": step_losses[-1] if step_losses else None,
    }


def load_concept(path: str) -> dict:
    """Load a concept file (weights_only) and check that it is ours and whole. Raises ValueError
    (one line naming the file, the key and what was expected); FileNotFoundError passes through."""
    foreign = foreign_file(path)
    if foreign:
        raise ValueError(f"{path} is {foreign}")
    try:
        concept = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # not a torch file, a truncated or corrupted one, or one holding arbitrary objects
        raise ValueError(f"{path} is not a concept file written by tune.py (it does not load: "
                         f"{e.__class__.__name__})") from None
    foreign = foreign_content(concept)
    if foreign:
        raise ValueError(f"{path} is {foreign}")
    if not isinstance(concept, dict) or concept.get("format") != CONCEPT_FORMAT:
        raise ValueError(f"{path} is not a concept file written by tune.py (no format {CONCEPT_FORMAT!r})")
    check_concept(concept, path)
    return concept


# What a file that is not ours is, and what to do with it (files people pass as --concept by
# mistake: what our export.py writes, what other personalisation tools write).
_MAKE_ONE = "make a concept file with `python tune.py --image IMG --out concept.pt`"


def foreign_file(path: str) -> str | None:
    """A safetensors file (a LoRA or a textual-inversion embedding from diffusers, kohya or our
    export.py) described in words, or None. Reads only the file's small JSON header."""
    import json

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 2 <= n <= 100_000_000:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    keys = [k for k in header if k != "__metadata__"]
    if any("lora" in k.lower() for k in keys):
        return (f"a LoRA in safetensors format ({len(keys)} tensors), not a concept file from tune.py: load it in "
                f"diffusers with pipe.load_lora_weights(...), or {_MAKE_ONE}")
    if keys and len(keys) <= 2:
        return (f"a textual-inversion embedding in safetensors format (key {keys[0]!r}), not a concept file from "
                f"tune.py: load it in diffusers with pipe.load_textual_inversion(...), or {_MAKE_ONE}")
    return f"a safetensors file ({len(keys)} tensors), not a concept file from tune.py: {_MAKE_ONE}"


def foreign_content(obj) -> str | None:
    """A loaded torch file that is someone else's (a textual-inversion .bin / .pt, our own encoder
    checkpoint), described in words, or None."""
    if not isinstance(obj, dict):
        return None
    if obj.get("format") == ENCODER_FORMAT:
        return ("an encoder checkpoint from pretrain.py, not a concept: make a concept with "
                "`python tune.py --encoder THIS_FILE --image IMG --out concept.pt`")
    if "string_to_param" in obj:
        return (f"a textual-inversion embedding (AUTOMATIC1111 format), not a concept file from tune.py: "
                f"use it in AUTOMATIC1111, or {_MAKE_ONE}")
    if "format" not in obj and len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        return (f"a textual-inversion embedding (diffusers format, token {next(iter(obj))!r}), not a concept file "
                f"from tune.py: load it in diffusers with pipe.load_textual_inversion(...), or {_MAKE_ONE}")
    return None


CONCEPT_KEYS = ("placeholder", "v_star", "token_id", "token", "lora_A", "lora_B", "rank", "lora_scale", "alpha_blend",
                "preset", "base")
# No tuned concept comes near this: SD 1.5's token embeddings have norms below 1 and a tuned LoRA's
# entries are far below 1. A larger value is a damaged file (and overflows in fp16).
MAX_ABS_VALUE = 1e4


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _what(x) -> str:
    """A value's type in words, for error messages (a tensor with its shape and dtype)."""
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def check_fields(obj: dict, path: str, kind: str, fields, optional=()):
    """Each (key, ok, what it must be) of `fields`: present (unless optional) and ok(value), else
    one ValueError line naming the file, the key, what was expected and what was found."""
    for key, ok, want in fields:
        if key not in obj:
            if key in optional:
                continue
            raise ValueError(f"{path} lacks {key}: not a complete {kind}")
        value = obj[key]
        if not ok(value):
            shown = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else _what(value)
            raise ValueError(f"{path}: {key} must be {want}, got {shown[:80]}")


def check_tensor(t, path: str, key: str, dims: int | None = None):
    """A floating-point tensor with finite, plausible values (and `dims` dimensions). Raises ValueError."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path}: {key} must be a tensor, got {_what(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{path}: {key} must hold floating-point numbers, got {_what(t)}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{path}: {key} must have {dims} dimension(s), got {_what(t)}")
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{path}: {key} holds NaN or infinite values (did training or tuning diverge?)")
    largest = t.detach().abs().max().item() if t.numel() else 0.0
    if largest > MAX_ABS_VALUE:
        raise ValueError(f"{path}: {key} holds values as large as {largest:.3g} "
                         f"(above {MAX_ABS_VALUE:g}): the file is damaged")


def check_concept(concept: dict, path: str = "the concept"):
    """The file on its own: every key present with its type, shapes that fit together, finite
    plausible numbers. (check_concept_fits checks it against a model.) Raises ValueError (one line)."""
    missing = [k for k in CONCEPT_KEYS if k not in concept]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a complete concept file")
    check_fields(concept, path, "concept file", fields=(
        ("placeholder", lambda x: isinstance(x, str) and x.strip() != "", "a non-empty string"),
        ("token", lambda x: isinstance(x, str), "a string"),
        ("preset", lambda x: x in PRESETS, f"one of {', '.join(PRESETS)}"),
        ("base", lambda x: isinstance(x, str), "a string"),
        ("token_id", lambda x: _is_int(x) and x >= 0, "a token id (an int >= 0)"),
        ("rank", lambda x: _is_int(x) and x > 0, "a positive int"),
        ("lora_scale", lambda x: _is_number(x) and math.isfinite(x), "a finite number"),
        ("alpha_blend", lambda x: _is_number(x) and 0 <= x <= 1, "a number in [0, 1]"),
        ("lora_A", lambda x: isinstance(x, dict), "a dict {layer: tensor}"),
        ("lora_B", lambda x: isinstance(x, dict), "a dict {layer: tensor}")))
    check_tensor(concept["v_star"], path, "v_star", dims=1)
    if concept["v_star"].numel() == 0:
        raise ValueError(f"{path}: v_star is empty")
    if set(concept["lora_A"]) != set(concept["lora_B"]):
        raise ValueError(f"{path}: lora_A and lora_B name different layers")
    r = concept["rank"]
    for name, A in concept["lora_A"].items():
        if not isinstance(name, str):
            raise ValueError(f"{path}: lora_A's layer names must be strings, got {_what(name)}")
        B = concept["lora_B"][name]
        check_tensor(A, path, f"lora_A[{name!r}]", dims=2)
        check_tensor(B, path, f"lora_B[{name!r}]", dims=2)
        if A.shape[1] != r or B.shape[0] != r:
            raise ValueError(f"{path}: layer {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, not (D_in, {r}) "
                             f"and ({r}, D_out)")


@dataclass
class Architecture:
    """What a concept must fit: the text encoder's width and vocabulary, and the (D_in, D_out)
    of every projection that takes a LoRA."""

    preset: str
    text_width: int
    vocab_size: int
    lora_shapes: dict  # {module path: (D_in, D_out)}


def architecture_of(comps: Components, layer_names: list[str]) -> Architecture:
    """The architecture of loaded components (layer_names: the UNet's LoRA layers)."""
    table = comps.token_table
    return Architecture(comps.preset, table.shape[1], table.shape[0],
                        dict(zip(layer_names, lora_shapes(comps.unet, layer_names))))


def preset_architecture(preset: str, base: str | None = None) -> Architecture:
    """A preset's architecture without its weights (export.py checks concepts against it): the
    UNet built on the meta device from its config. toy reads the world's config files (the world
    must exist); sd15 is SD 1.5's architecture, the same for every SD 1.5 fine-tune."""
    from diffusers import UNet2DConditionModel

    if preset in ("sd15", "sd15-arch"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**_sd15_unet_kwargs())
        width, vocab = 768, 49408
    elif preset == "tiny":
        parts = _build_random("tiny", "meta", with_image_encoder=False)
        unet, te = parts["unet"], parts["text_encoder"]
        width, vocab = te.get_input_embeddings().weight.shape[1], te.get_input_embeddings().weight.shape[0]
    else:
        import json

        base = weights_for(preset, base, None)[0]
        with _weights_error(preset, "--base", base):
            with open(os.path.join(base, "text_encoder", "config.json")) as f:
                te = json.load(f)
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
        width, vocab = te["hidden_size"], te["vocab_size"]
    names = dualpath.lora_layer_names(unet)
    return Architecture(preset, width, vocab, dict(zip(names, lora_shapes(unet, names))))


def check_concept_fits(concept: dict, path: str, arch: Architecture, tokenizer=None):
    """A (checked) concept against the model it is applied to: v* as wide as the text encoder's
    token embeddings, its hard token a word of this vocabulary (and, given the tokenizer, the
    word the file names), every LoRA layer a projection of this UNet with A (D_in, r) and
    B (r, D_out) for that projection. Raises ValueError (one line)."""
    if concept["preset"] != arch.preset:
        raise ValueError(f"{path} was tuned for preset {concept['preset']!r}, not {arch.preset!r}: use it with "
                         f"--preset {concept['preset']}, or tune a concept for {arch.preset} with "
                         f"`python tune.py --preset {arch.preset} --image IMG`")
    D = concept["v_star"].numel()
    if D != arch.text_width:
        raise ValueError(f"{path}: v_star has {D} numbers, but this text encoder's token embeddings have "
                         f"{arch.text_width}: the file is damaged or from another model")
    tid = concept["token_id"]
    if not 0 <= tid < arch.vocab_size or tid in SPECIAL_IDS:
        raise ValueError(f"{path}: token_id {tid} is not a word of this text encoder's vocabulary "
                         f"(ids 0-{arch.vocab_size - 1}, not the start/end tokens)")
    if tokenizer is not None:
        word = token_word(tokenizer, tid)
        if word != concept["token"]:
            raise ValueError(f"{path}: token_id {tid} is {word!r} in this tokenizer, but the file names "
                             f"{concept['token']!r}: the file is damaged or from another tokenizer")
    for name, A in concept["lora_A"].items():
        if name not in arch.lora_shapes:
            raise ValueError(f"{path}: LoRA layer {name!r} is not an attention projection of this UNet "
                             f"(preset {arch.preset}): the file is damaged or from another model")
        d_in, d_out = arch.lora_shapes[name]
        B, r = concept["lora_B"][name], concept["rank"]
        if tuple(A.shape) != (d_in, r) or tuple(B.shape) != (r, d_out):
            raise ValueError(f"{path}: layer {name} has A {tuple(A.shape)} and B {tuple(B.shape)}; this UNet's "
                             f"projection needs ({d_in}, {r}) and ({r}, {d_out})")


def concept_lora(concept: dict, device=None, dtype=None) -> dict:
    """{module path: (A (1, D_in, r), B (1, r, D_out))} from a concept, ready for dual_path_kwargs."""
    return {
        name: (A[None].to(device=device, dtype=dtype), concept["lora_B"][name][None].to(device=device, dtype=dtype))
        for name, A in concept["lora_A"].items()
    }


@torch.no_grad()
def encode_concept_prompts(text_encoder, tokenizer, concept: dict, prompts: list[str]):
    """(C, C_h) of prompts for a concept file: v* at the placeholder, and its stored nearest token."""
    device = text_encoder.get_input_embeddings().weight.device
    ph = concept["placeholder"]
    C = encode_prompt(text_encoder, tokenizer, prompts, v_star=concept["v_star"].to(device)[None], placeholder=ph)
    C_h = encode_prompt(text_encoder, tokenizer, prompts, hard_ids=torch.tensor([concept["token_id"]]), placeholder=ph)
    return C, C_h  # (N, 77, D) each
