"""
export.py -- a concept file as files that diffusers, AUTOMATIC1111 and ComfyUI load as they are.

An exported concept is the alpha = 1 model of Eq. (5): the LoRA of Eq. (2) on the 96 q/k/v
projections, plus v* as the embedding of a new token. The dual path (the second, vanilla
attention with the hard prompt C_h, blended with weight 1 - alpha) has no place in these
formats, so exported samples are those of `sample.py --alpha-blend 1`, not of sample.py's
default alpha 0.25: they keep more of the concept's identity and less of the prompt.

    python export.py --concept concept.pt --out my-dog/                       # both formats
    python export.py --concept concept.pt --out my-dog/ --format kohya --token "<my-dog>"

Writes into OUT (atomically; an existing non-empty OUT needs --force):
    diffusers   pytorch_lora_weights.safetensors   PEFT keys: unet.<module>.lora_A.weight / .lora_B.weight
                learned_embeds.safetensors         {token: v*}
    kohya       <name>.safetensors                 lora_unet_<module_with_underscores>.lora_down / .lora_up / .alpha
                <name>-embedding.safetensors       {"emb_params": v* (1, D)}; the trigger word is the file's stem
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

import cmdline
import model

FORMATS = ("diffusers", "kohya")
PROJECT = "date-reference (Domain-Agnostic Tuning-Encoder, Arar, Gal et al. 2023)"


@dataclass
class Config:
    concept: str = ""  # the concept file to export (tune.py output; required)
    out: str = ""  # output folder (required); must be empty or new unless --force
    format: str = ",".join(FORMATS)  # comma list of diffusers, kohya
    token: str | None = None  # the new word for the concept; default <concept file's stem>
    force: bool = False  # write into a non-empty OUT (replacing our files there)
    base: str | None = None  # toy / sd15: the model folder the concept is checked against (default: the concept's)


UserError = cmdline.UserError


def parse_args(argv=None) -> Config:
    p = cmdline.config_parser(Config, __doc__.split("\n\n")[0].strip(), required=("concept", "out"))
    return Config(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------
# Conventions. Ours: y = x W + s (x A) B with A (D_in, r), B (r, D_out) (Eq. 2, row vectors).
# torch.nn.Linear stores W as (D_out, D_in) and computes x W^T, so our Delta W in its layout is
#     Delta W_linear = s * (A B)^T = (s B^T) @ A^T          (D_out, D_in)
# Both formats below store a "down" (r, D_in) and an "up" (D_out, r) matrix with
#     Delta W_linear = (alpha / r) * up @ down
# and we write alpha = r (scale 1) with the concept's lora_scale s folded into the up matrix,
# so that every loader reproduces s * A B exactly, whatever it assumes about alpha.


def lora_matrices(concept: dict) -> dict:
    """{module path: (down (r, D_in), up (D_out, r))} with Delta W_linear = up @ down."""
    s = float(concept["lora_scale"])
    return {name: (A.T.contiguous(), (s * concept["lora_B"][name]).T.contiguous())
            for name, A in concept["lora_A"].items()}


def diffusers_lora(concept: dict) -> dict:
    out = {}
    for name, (down, up) in lora_matrices(concept).items():
        out[f"unet.{name}.lora_A.weight"] = down
        out[f"unet.{name}.lora_B.weight"] = up
    return out


def kohya_name(module_path: str) -> str:
    """The kohya / AUTOMATIC1111 key of a UNet module: lora_unet_ + the path with dots as underscores."""
    return "lora_unet_" + module_path.replace(".", "_")


def kohya_lora(concept: dict) -> dict:
    out = {}
    for name, (down, up) in lora_matrices(concept).items():
        key = kohya_name(name)
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = r: scale 1
    return out


def metadata(concept: dict, token: str, fmt: str) -> dict:
    """The safetensors header: what the file is, where it came from (strings only)."""
    rank = int(concept["rank"])
    meta = {"format": "pt", "project": PROJECT, "export_format": fmt, "base_model": concept.get("base") or "",
            "preset": concept["preset"], "rank": str(rank), "lora_scale_folded_into_up": str(concept["lora_scale"]),
            "token": token, "nearest_real_token": concept["token"],
            "alpha_blend_when_tuned": str(concept["alpha_blend"]),
            "tuning": json.dumps(concept.get("tuning", {}), default=str),
            "note": "alpha = 1 export: the LoRA and v*; the dual path of Eq. (5) is not representable"}
    if fmt == "kohya":  # the fields kohya's scripts write, which AUTOMATIC1111 and ComfyUI display
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(rank),
                    ss_base_model_version="sd_v1")
    return meta


def check_token(token: str, tokenizer) -> str:
    """A usable new word: no whitespace, not a word (or word piece) the tokenizer already knows."""
    if not token or re.search(r"\s", token):
        raise UserError(f"--token must be one word without spaces, got {token!r}")
    vocab = tokenizer.get_vocab()
    if token in vocab or token.lower() + "</w>" in vocab or token.lower() in vocab:
        raise UserError(f"--token {token!r} is already a word of the tokenizer; pick a new one, e.g. <{token}>")
    return token


def file_stem(token: str) -> str:
    """A file name for the token (AUTOMATIC1111 triggers an embedding by its file name)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", token).strip("-.")
    if not stem:
        raise UserError(f"--token {token!r} has no characters usable in a file name")
    return stem


# ----------------------------------------------------------------------------------------


def export(concept: dict, out: str, formats: list[str], token: str, force: bool = False) -> list[str]:
    """Write the formats into `out` through a temporary folder, so `out` never holds half an export."""
    files = {}
    v = concept["v_star"].float().contiguous()
    if "diffusers" in formats:
        files["pytorch_lora_weights.safetensors"] = (diffusers_lora(concept), metadata(concept, token, "diffusers"))
        files["learned_embeds.safetensors"] = ({token: v}, metadata(concept, token, "diffusers"))
    if "kohya" in formats:
        stem = file_stem(token)
        files[f"{stem}.safetensors"] = (kohya_lora(concept), metadata(concept, token, "kohya"))
        files[f"{stem}-embedding.safetensors"] = ({"emb_params": v[None]}, metadata(concept, token, "kohya"))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        for name, (tensors, meta) in files.items():
            save_file(tensors, os.path.join(tmp, name), metadata=meta)
        os.makedirs(out, exist_ok=True)
        for name in files:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(files)


def main(cfg: Config):
    # 1) Check everything before writing anything.
    formats = [f.strip() for f in cfg.format.split(",") if f.strip()]
    if not formats or set(formats) - set(FORMATS):
        raise UserError(f"--format: choose from {', '.join(FORMATS)}, got {cfg.format!r}")
    if not os.path.isfile(cfg.concept):
        raise UserError(f"no concept file at {cfg.concept}")
    try:
        concept = model.load_concept(cfg.concept)  # checks keys, shapes and finiteness too
        # ... and against its model's architecture (text width, vocabulary, LoRA layer shapes), so
        # that a damaged concept never leaves as a broken LoRA in someone else's tool.
        model.check_concept_fits(concept, cfg.concept, model.preset_architecture(concept["preset"],
                                                                                  cfg.base or concept["base"] or None),
                                 model.build_tokenizer())
    except ValueError as e:
        raise UserError(str(e)) from None
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UserError(f"--out {cfg.out} exists and is not a folder")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.force:
        raise UserError(f"--out {cfg.out} is not empty; pass --force to write into it")
    token = check_token(cfg.token or f"<{os.path.splitext(os.path.basename(cfg.concept))[0]}>", model.build_tokenizer())
    if not concept["lora_A"]:
        print("export.py: note: this concept has no LoRA (textual inversion): the LoRA files are empty",
              file=sys.stderr)

    # 2) Write.
    names = export(concept, cfg.out, formats, token, cfg.force)
    print(f"wrote {', '.join(names)} to {cfg.out}/ (token {token!r}, rank {concept['rank']}, alpha = 1 export)",
          file=sys.stderr)
    return names


def cli(argv=None) -> int:
    return cmdline.run_cli("export.py", main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
