"""export.py: diffusers' own loaders reproduce sample.py at alpha = 1, the kohya file reads back
to the concept's Delta W, and bad input ends in one line with nothing written."""
import copy
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cmdline
import data
import export
import model
import sample
import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "concept.png")
PROMPT = "a photo of {} on the beach"


@pytest.fixture(scope="module")
def concept_file(tmp_path_factory, tiny):
    comps, names = tiny
    cfg = tune.Config(image=IMAGE, encoder="random", steps=2, batch_size=2)
    concept, _ = tune.tune_concept(comps, tune.build_tuning_encoder(None, comps, names, 0), data.load_image(IMAGE), cfg,
                                   log=lambda s: None)
    # Give the LoRA a visible effect (B starts at zero and 2 steps move it little).
    g = torch.Generator().manual_seed(0)
    concept["lora_B"] = {k: 0.3 * torch.randn(B.shape, generator=g) for k, B in concept["lora_B"].items()}
    concept["lora_scale"] = 0.7  # a non-trivial scale must come out exactly
    path = tmp_path_factory.mktemp("c") / "mydog.pt"
    cmdline.atomic_save(concept, str(path))
    return str(path), concept


def _plain_pipeline():
    """A vanilla StableDiffusionPipeline from the tiny parts: no processors of ours, own tokenizer."""
    comps = model.load_components("tiny", with_image_encoder=False)
    comps.tokenizer = copy.deepcopy(comps.tokenizer)  # load_textual_inversion adds a token to it
    return comps, sample.build_pipeline(comps)


def _ours_at_alpha_1(tiny, concept):
    comps, _ = tiny
    return sample.generate(sample.build_pipeline(comps), comps, concept, PROMPT.format("S*"), num_images=2, steps=4,
                           seed=3, alpha_blend=1.0, output_type="latent")


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_loaders_reproduce_sample_py_at_alpha_1(tmp_path, tiny, concept_file, fmt):
    path, concept = concept_file
    out = tmp_path / "exp"
    assert export.cli(["--concept", path, "--out", str(out), "--format", fmt]) == 0
    comps, pipe = _plain_pipeline()
    if fmt == "diffusers":
        pipe.load_lora_weights(str(out))
        pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    else:
        pipe.load_lora_weights(str(out), weight_name="mydog.safetensors")
        emb = load_file(str(out / "mydog-embedding.safetensors"))["emb_params"]
        pipe.load_textual_inversion(emb[0], token="<mydog>")
    gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    theirs = pipe(prompt=[PROMPT.format("<mydog>")] * 2, num_inference_steps=4, generator=gens, output_type="latent",
                  height=32, width=32).images
    ours = _ours_at_alpha_1(tiny, concept)
    assert (theirs - ours).abs().max() <= 1e-3 * ours.abs().max(), (theirs - ours).abs().max()
    # ...and the LoRA mattered: without it the latents differ.
    pipe.unload_lora_weights()
    gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    no_lora = pipe(prompt=[PROMPT.format("<mydog>")] * 2, num_inference_steps=4, generator=gens, output_type="latent",
                   height=32, width=32).images
    assert (no_lora - ours).abs().max() > 1e-2 * ours.abs().max()


def _read_kohya(path):
    """An independent reader: Delta W_linear = alpha / r * up @ down, per module path."""
    sd = load_file(path)
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            down, up, alpha = sd[key], sd[stem + ".lora_up.weight"], sd[stem + ".alpha"]
            out[stem] = alpha / down.shape[0] * up @ down
    return out


def test_kohya_file_reads_back_as_the_concepts_delta_w(tmp_path, concept_file):
    path, concept = concept_file
    assert export.cli(["--concept", path, "--out", str(tmp_path / "k"), "--format", "kohya", "--token", "<dog-x>"]) == 0
    assert sorted(os.listdir(tmp_path / "k")) == ["dog-x-embedding.safetensors", "dog-x.safetensors"]
    back = _read_kohya(str(tmp_path / "k" / "dog-x.safetensors"))
    assert len(back) == len(concept["lora_A"])
    for name, A in concept["lora_A"].items():
        delta_w = concept["lora_scale"] * A @ concept["lora_B"][name]  # (D_in, D_out), our layout
        assert torch.allclose(back["lora_unet_" + name.replace(".", "_")], delta_w.T, atol=1e-6), name
    with safe_open(str(tmp_path / "k" / "dog-x.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["preset"] == "tiny" and meta["rank"] == str(concept["rank"]) and meta["ss_network_dim"] == meta["rank"]
    assert "date-reference" in meta["project"] and '"steps": 2' in meta["tuning"]
    emb = load_file(str(tmp_path / "k" / "dog-x-embedding.safetensors"))["emb_params"]
    assert torch.equal(emb[0], concept["v_star"])


def test_bad_input_exits_2_and_writes_nothing(tmp_path, concept_file, capsys):
    path, concept = concept_file
    torch.save({"hello": torch.zeros(2)}, tmp_path / "notours.pt")
    broken = dict(concept, v_star=torch.full_like(concept["v_star"], float("nan")))
    torch.save(broken, tmp_path / "nan.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [["--concept", path, "--out", str(tmp_path / "a"), "--token", "dog"],  # a known word
             ["--concept", path, "--out", str(tmp_path / "a"), "--token", "my dog"],
             ["--concept", str(tmp_path / "notours.pt"), "--out", str(tmp_path / "a")],
             ["--concept", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "a")],
             ["--concept", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "a")],
             ["--concept", path, "--out", str(tmp_path / "a"), "--format", "onnx"],
             ["--concept", path, "--out", str(tmp_path / "full")]]
    for args in cases:
        assert export.cli(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("export.py: error:"), err
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path / "full") == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export-")]
    # --force writes beside what is there.
    assert export.cli(["--concept", path, "--out", str(tmp_path / "full"), "--force"]) == 0
    assert "pytorch_lora_weights.safetensors" in os.listdir(tmp_path / "full")
