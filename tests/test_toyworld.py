"""toyworld.py: a seconds-long micro version of every stage, the toy base loaded through the same
--base / --clip code as SD 1.5, a toy concept through tune -> sample, and the competence and
validation measurements computed by the code the README's numbers come from."""
import dataclasses
import json
import math
import os
import shutil
import random
import time

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cmdline
import evaluate
import model
import pretrain
import sample
import toyworld
import tune


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    # jobs=1: in this process (the rebuild below spawns two lanes)
    cfg = toyworld.Config(out=out, n_train=64, vae_steps=2, clip_steps=2, metric_clip_steps=2, text_clip_steps=2,
                          t2i_steps=2, batch_size=4, clip_batch_size=8, judge_steps=2, judge_batch_size=4,
                          competence_per_class=1, competence_steps=2, competence_renders=8, jobs=1)
    times = toyworld.main(cfg)
    return out, cfg, times


def test_every_stage_runs_and_a_rerun_reuses_them(toy):
    out, cfg, times = toy
    assert list(times) == list(toyworld.STAGES)
    assert toyworld.main(cfg) == {}  # all cached
    # Saved in their own ecosystems' formats.
    assert json.load(open(os.path.join(out, "sd", "model_index.json")))["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(out, "sd", sub)), sub
    for name in ("clip-h", "clip-b", "clip-l"):
        cfg_file = os.path.join(out, name, "open_clip_config.json")
        assert json.load(open(cfg_file))["model_cfg"] == toyworld.CLIP_CONFIGS[name]
    assert len(os.listdir(os.path.join(out, "train"))) == cfg.n_train
    concepts = sorted(f for f in os.listdir(os.path.join(out, "concepts")) if f.endswith(".png"))
    assert len(concepts) == toyworld.N_CONCEPTS == 12 and "labels.json" in os.listdir(os.path.join(out, "concepts"))
    assert len(os.listdir(os.path.join(out, "heldout"))) == toyworld.N_HELDOUT
    # The second photos: the concepts' instances again, under the same names, in other pixels.
    assert sorted(os.listdir(os.path.join(out, "second-photos"))) == concepts
    for name in concepts:
        first, second = (open(os.path.join(out, d, name), "rb").read() for d in ("concepts", "second-photos"))
        assert first != second


def test_the_same_seed_builds_the_same_world_and_models(toy, tmp_path):
    """--seed fixes every stage, whatever --jobs: a second micro build, its stages now in two
    spawned lanes, gives bit-identical pictures, weights and competence."""
    out, cfg, _ = toy
    assert cfg.jobs == 1
    toyworld.main(dataclasses.replace(cfg, out=str(tmp_path), jobs=2))
    picture = os.path.join("train", sorted(os.listdir(os.path.join(out, "train")))[0])
    assert open(os.path.join(out, picture), "rb").read() == open(os.path.join(tmp_path, picture), "rb").read()
    for f in ("sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
              "sd/text_encoder/model.safetensors", "clip-h/open_clip_model.safetensors",
              "clip-b/open_clip_model.safetensors", "clip-l/open_clip_model.safetensors"):
        a, b = load_file(os.path.join(out, f)), load_file(os.path.join(tmp_path, f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    a, b = (torch.load(os.path.join(d, "judge.pt"), weights_only=True)["judge"] for d in (out, tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(out, "competence.json"))) == json.load(open(tmp_path / "competence.json"))


def test_a_failed_lane_stops_the_lane_waiting_for_it(toy, tmp_path):
    """The t2i stage waits for the other lane's VAE; when the VAE fails (batch size 0), the
    build stops with the failed stage named instead of waiting for ever."""
    _, cfg, _ = toy
    with pytest.raises(RuntimeError, match="the stage\\(s\\) vae"):
        toyworld.main(dataclasses.replace(cfg, out=str(tmp_path), jobs=2, batch_size=0))
    assert toyworld.done(str(tmp_path), "clip-l") and not toyworld.done(str(tmp_path), "t2i")


def test_judge_width_sets_the_judges_channels(toy, tmp_path):
    """--judge-width: the judge stage alone, on a copy of the micro world, trains a judge of that
    width (load_judge rebuilds it from the file); a width its GroupNorm cannot split is refused."""
    out, cfg, _ = toy
    copy = str(tmp_path / "w")
    shutil.copytree(out, copy)
    toyworld.main(dataclasses.replace(cfg, out=copy, stage="judge", judge_width=8))
    judge = toyworld.load_judge(os.path.join(copy, "judge.pt"))
    assert judge.body[0][0].out_channels == 8 and toyworld.load_judge(os.path.join(out, "judge.pt")).body[0][0].out_channels == 32
    assert toyworld.parse_args(["--judge-width", "16"]).judge_width == 16
    with pytest.raises(cmdline.UserError, match="multiple of 8"):
        toyworld.parse_args(["--judge-width", "12"])


def test_narrower_vae_and_unet_and_fast_training_build_models_the_method_loads(toy, tmp_path, monkeypatch):
    """--vae-width / --unet-width set the two models' channels (saved in their configs, so the
    toy preset loads them as any other world), and --fast-training trains every stage with fused
    AdamW; the widths must suit GroupNorm's 16 groups."""
    out, cfg, _ = toy
    copy = str(tmp_path / "w")
    shutil.copytree(out, copy)
    for gone in ("sd", "latents.pt", "vae.ckpt", "t2i.ckpt", "judge.pt", "judge.ckpt", "clip-l", "clip-l.ckpt"):
        path = os.path.join(copy, gone)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    fused, adamw = [], torch.optim.AdamW

    class Recording(adamw):
        def __init__(self, *a, **kw):
            fused.append(kw.get("fused"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    for stage in ("vae", "judge", "clip-l", "t2i"):
        toyworld.main(dataclasses.replace(cfg, out=copy, stage=stage, vae_width=32, unet_width=48, fast_training=True))
    monkeypatch.undo()
    assert fused == [True] * 4
    vae = json.load(open(os.path.join(copy, "sd", "vae", "config.json")))
    unet = json.load(open(os.path.join(copy, "sd", "unet", "config.json")))
    assert vae["block_out_channels"] == [32, 32] and unet["block_out_channels"] == [32, 48, 48]
    assert json.load(open(os.path.join(out, "sd", "unet", "config.json")))["block_out_channels"] == [32, 64, 64]
    comps = model.load_components("toy", base=os.path.join(copy, "sd"), with_image_encoder=False)
    assert list(comps.unet.config.block_out_channels) == [32, 48, 48]
    os.remove(os.path.join(copy, "competence.json"))
    toyworld.main(dataclasses.replace(cfg, out=copy, stage="competence"))  # draws through the toy preset
    assert set(json.load(open(os.path.join(copy, "competence.json")))["drawing"]) == {*toyworld.CLASSES, "all"}
    for flag in ("--vae-width", "--unet-width"):
        assert getattr(toyworld.parse_args([flag, "48"]), flag[2:].replace("-", "_")) == 48
        with pytest.raises(cmdline.UserError, match="multiple of 16"):
            toyworld.parse_args([flag, "40"])


def test_clip_training_reads_captions_to_their_last_token_as_the_whole_context_does():
    """encode_captions (--fast-training) is open_clip's encode_text on a shorter context: the
    towers are causal and pool at the end-of-text token, so the embeddings are the same function
    (float64: equal to rounding), for the 77-token clip-l and the 32-token CLIPs."""
    rng = random.Random(0)
    insts = toyworld.train_instances()
    texts = [toyworld.clip_caption(rng.choice(insts), "red", "small", rng) for _ in range(16)] + ["a photo of a ring"]
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    for name in ("clip-l", "clip-h"):
        torch.manual_seed(0)
        clip = open_clip.CLIP(**toyworld.CLIP_CONFIGS[name]).double()
        ids = tokenizer(texts, context_length=clip.context_length)
        assert ids.ne(0).sum(1).max() < clip.context_length  # the shortcut has something to cut
        full, short = clip.encode_text(ids), toyworld.encode_captions(clip, ids)
        assert torch.allclose(full, short, atol=1e-12) and full.std() > 0.01


def test_an_instances_fill_is_drawn_once_and_the_pictures_are_unchanged():
    """render() takes an instance's fill from a cache (the same for every class of one instance);
    the pictures equal fills drawn afresh."""
    inst = toyworld.train_instances()[7]
    twin = dataclasses.replace(inst, cls="heart" if inst.cls != "heart" else "ring")
    assert toyworld._pattern(inst, 128) is toyworld._pattern(twin, 128)
    fresh = toyworld._draw_pattern(inst, 128, (toyworld.COLOURS[inst.colour1], toyworld.COLOURS[inst.colour2]))
    assert fresh.tobytes() == toyworld._pattern(inst, 128).tobytes()
    other = dataclasses.replace(inst, colour1=inst.colour2, colour2=inst.colour1)
    assert toyworld._pattern(other, 128).tobytes() != fresh.tobytes()


def test_competence_draws_at_the_competence_guidance(toy, tmp_path, monkeypatch):
    """--competence-guidance reaches every competence drawing and is recorded beside the numbers."""
    out, cfg, _ = toy
    copy = str(tmp_path / "w")
    shutil.copytree(out, copy)
    used, generate = [], toyworld.sample.generate
    monkeypatch.setattr(toyworld.sample, "generate", lambda *a, **kw: (used.append(kw["guidance"]), generate(*a, **kw))[1])
    toyworld.main(dataclasses.replace(cfg, out=copy, stage="competence", competence_guidance=9.0))
    assert len(used) == cfg.competence_per_class * len(toyworld.CLASSES) and set(used) == {9.0}
    assert json.load(open(os.path.join(copy, "competence.json")))["settings"]["guidance"] == 9.0
    assert toyworld.Config().competence_guidance == 12.0


def test_t2i_detail_rate_makes_the_instances_words_words_and_competence_draws_them(toy, tmp_path):
    """--t2i-detail-rate > 0: the t2i stage alone, on a copy of the micro world, keeps the words
    that name pattern and colours as rows of the text encoder (the default world zeroes them), and
    competence then also draws instances named in words and lets the judge read them."""
    out, cfg, _ = toy
    copy = str(tmp_path / "w")
    shutil.copytree(out, copy)
    for f in ("t2i.ckpt", "competence.json"):
        if os.path.exists(os.path.join(copy, f)):
            os.remove(os.path.join(copy, f))
    toyworld.main(dataclasses.replace(cfg, out=copy, stage="t2i", t2i_detail_rate=1.0))
    toyworld.main(dataclasses.replace(cfg, out=copy, stage="competence"))
    tok = model.build_tokenizer()
    for folder, knows in ((copy, True), (out, False)):
        comps = model.load_components("toy", base=os.path.join(folder, "sd"), with_image_encoder=False)
        assert toyworld.knows_detail_words(comps) is knows
        words = set(model.word_rows(comps.token_table).nonzero().flatten().tolist())
        assert words == toyworld.caption_token_ids(tok, details=knows)
    assert toyworld.caption_token_ids(tok) < toyworld.caption_token_ids(tok, details=True)
    named = json.load(open(os.path.join(copy, "competence.json")))["drawing_named_instance"]
    assert set(named) == {"class", "pattern", "colours", "background", "size"}
    assert all(v["n"] == cfg.competence_per_class * len(toyworld.CLASSES) and 0 <= v["mean"] <= 1 for v in named.values())
    assert "drawing_named_instance" not in json.load(open(os.path.join(out, "competence.json")))
    assert toyworld.parse_args(["--t2i-detail-rate", "0.5"]).t2i_detail_rate == 0.5
    with pytest.raises(cmdline.UserError, match="between 0 and 1"):
        toyworld.parse_args(["--t2i-detail-rate", "1.5"])


def test_captions_name_class_and_context_but_never_the_instance(toy):
    inst = toyworld.make_instance(7)
    cap = toyworld.t2i_caption(inst.cls, "blue", "small")
    assert cap == f"a photo of a small {inst.cls} on a blue background"
    assert inst.pattern not in cap and inst.colour1 not in cap and inst.colour2 not in cap
    assert inst.pattern in inst.details() and inst.colour1 in inst.details()
    a = toyworld.render(inst, "red", "large", random.Random(1))
    assert a.size == (32, 32) and a.tobytes() == toyworld.render(inst, "red", "large", random.Random(1)).tobytes()
    # The background is the named colour; a large object covers several times the area of a small one.
    bg = toyworld.BACKGROUNDS["red"]
    covered = lambda im: sum(px != bg for px in im.getdata())  # noqa: E731
    small = toyworld.render(inst, "red", "small", random.Random(1))
    assert max(set(small.getdata()), key=list(small.getdata()).count) == bg  # most pixels are the background
    assert covered(a) > 2 * covered(small) > 0  # radius ~0.27 vs ~0.145 of the picture (edges blur it)


def test_evaluation_concepts_are_instances_no_training_stage_saw():
    train = {(i.cls, i.pattern, i.colour1, i.colour2) for i in toyworld.train_instances()}
    ev = toyworld.eval_instances(12)
    assert len(ev) == 12 and not {(i.cls, i.pattern, i.colour1, i.colour2) for i in ev} & train
    assert {i.cls for i in ev} == set(toyworld.CLASSES)


def test_heldout_pictures_are_further_unseen_instances_in_varied_contexts(tmp_path):
    toyworld.write_heldout(str(tmp_path), n=12)
    names = sorted(os.listdir(tmp_path / "heldout"))
    first = (tmp_path / "heldout" / names[0]).read_bytes()
    toyworld.write_heldout(str(tmp_path), n=12)  # seeded: the same pictures again
    assert (tmp_path / "heldout" / names[0]).read_bytes() == first
    concepts = toyworld.eval_instances(toyworld.N_CONCEPTS)
    heldout = toyworld.eval_instances(toyworld.N_CONCEPTS + 12)[toyworld.N_CONCEPTS:]
    train = {(i.cls, i.pattern, i.colour1, i.colour2) for i in toyworld.train_instances()}
    assert not set(heldout) & set(concepts) and not {(i.cls, i.pattern, i.colour1, i.colour2) for i in heldout} & train
    # The file names record each picture's class and context; the contexts vary.
    parts = [n[:-4].split("_") for n in names]
    assert [p[1] for p in parts] == [i.cls for i in heldout]
    assert len({p[2] for p in parts}) >= 3 and {p[3] for p in parts} == set(toyworld.SIZES)
    # A world rendered before the held-out pictures existed counts as not done.
    (tmp_path / "world.pt").write_bytes(b"x")
    toyworld.write_second_photos(str(tmp_path))
    assert toyworld.done(str(tmp_path), "world")
    os.rename(tmp_path / "heldout", tmp_path / "old")
    assert not toyworld.done(str(tmp_path), "world")


def test_toy_loads_through_the_sd15_base_and_clip_code(toy, monkeypatch):
    out, _, _ = toy
    created = []
    real = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: (created.append(name), real(name, **kw))[1])
    comps = model.load_components("toy", base=os.path.join(out, "sd"), clip=os.path.join(out, "clip-h"))
    assert created == ["local-dir:" + os.path.join(out, "clip-h")]
    assert comps.base == os.path.join(out, "sd") and comps.noise_scheduler.config.clip_sample is False
    saved = load_file(os.path.join(out, "clip-h", "open_clip_model.safetensors"))
    assert torch.equal(comps.image_encoder.conv1.weight, saved["visual.conv1.weight"])
    assert comps.text_encoder.config.hidden_size == comps.cfg.token_dim == 64
    assert comps.unet.config.sample_size * 2 == comps.cfg.resolution
    metric = evaluate.ClipMetric("toy", "cpu", os.path.join(out, "clip-b"))
    assert {type(m).__name__ for m in metric.model.visual.modules()} >= {"QuickGELU"}


def test_toy_concept_round_trips_through_tune_and_sample(toy, tmp_path):
    out, _, _ = toy
    weights = ["--preset", "toy", "--base", os.path.join(out, "sd"), "--device", "cpu"]
    image = os.path.join(out, "concepts", sorted(os.listdir(os.path.join(out, "concepts")))[0])
    concept = tmp_path / "c.pt"
    assert tune.cli(["--image", image, "--encoder", "random", "--clip", os.path.join(out, "clip-h"), "--steps", "2",
                     "--batch-size", "2", "--out", str(concept)] + weights) == 0
    c = model.load_concept(str(concept))
    assert c["preset"] == "toy" and c["base"] == os.path.join(out, "sd") and len(c["lora_A"]) == 42
    assert sample.cli(["--concept", str(concept), "--prompt", "a photo of a small S* on a red background",
                       "--num-images", "1", "--steps", "2", "--out", str(tmp_path / "s")] + weights) == 0
    assert len(os.listdir(tmp_path / "s")) == 2  # the image and the grid


def test_competence_is_measured_by_the_code_the_readme_reports(toy):
    out, cfg, _ = toy
    rep = json.load(open(os.path.join(out, "competence.json")))
    factors = {"class", "pattern", "colours", "background", "size"}
    judge = dict(rep["judge"])
    assert set(judge.pop("restyled_after_vae")) == {"class", "background", "size"}
    for scores in list(judge.values()) + list(rep["clip_zero_shot"].values()):
        assert set(scores) == factors and all(s["n"] == cfg.competence_renders for s in scores.values())
    assert set(rep["clip_zero_shot"]) == {"clip-h", "clip-b"}
    assert set(rep["drawing"]) == set(toyworld.CLASSES) | {"all"}
    assert rep["drawing"]["all"]["class"]["n"] == cfg.competence_per_class * len(toyworld.CLASSES)
    tt = rep["text_tower"]["pairwise_cos"]
    assert -1 <= tt["min"] <= tt["mean"] <= tt["max"] <= 1
    assert set(rep["text_tower"]["least_separated"]) <= set(toyworld.CLASSES)
    ident = rep["identity"]
    assert ident["margin"]["n"] == 24
    margin = ident["same_instance"]["mean"] - ident["other_instance_same_class"]["mean"]
    assert ident["margin"]["mean"] == pytest.approx(margin)


def test_a_stage_resumes_only_a_checkpoint_of_the_same_length(tmp_path):
    """Same length: an interrupted stage goes on from its checkpoint (a finished one takes no
    step). Another length: it starts over at step 0, since the cosine schedule depends on it."""
    lin = torch.nn.Linear(2, 1)
    seen = []

    def step_fn(step):
        seen.append(step)
        return lin(torch.ones(1, 2)).pow(2).sum()

    toyworld.train_loop("m", str(tmp_path), list(lin.parameters()), step_fn, 4, 1e-2, {"m": lin}, ckpt_every=2)
    assert seen == [0, 1, 2, 3]
    ck = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert (ck["step"], ck["steps"]) == (4, 4)
    toyworld.train_loop("m", str(tmp_path), list(lin.parameters()), step_fn, 4, 1e-2, {"m": lin}, ckpt_every=2)
    assert seen == [0, 1, 2, 3]  # finished: nothing to do
    torch.save({**ck, "step": 2}, tmp_path / "m.ckpt")  # as if interrupted after step 2
    toyworld.train_loop("m", str(tmp_path), list(lin.parameters()), step_fn, 4, 1e-2, {"m": lin}, ckpt_every=2)
    assert seen[4:] == [2, 3]
    toyworld.train_loop("m", str(tmp_path), list(lin.parameters()), step_fn, 6, 1e-2, {"m": lin}, ckpt_every=2)
    assert seen[6:] == [0, 1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "m.ckpt", weights_only=True)["steps"] == 6


def test_text_tower_separation_reads_the_class_words(toy):
    """Six class words the tower cannot tell apart (their embedding rows made equal) give six
    identical prompts: every pairwise cosine is 1. The real rows give less."""
    out, _, _ = toy
    comps = model.load_components("toy", base=os.path.join(out, "sd"), clip=os.path.join(out, "clip-h"),
                                  with_image_encoder=False)
    real = toyworld.text_tower_separation(comps)["pairwise_cos"]
    assert real["max"] < 0.9999
    emb = comps.text_encoder.get_input_embeddings().weight
    ids = [model.tokenize_ids(comps.tokenizer, c) for c in toyworld.CLASSES]
    assert all(len(i) == 1 for i in ids)  # one token per class word
    with torch.no_grad():
        for i in ids:
            emb[i[0]] = emb[ids[0][0]]
    same = toyworld.text_tower_separation(comps)["pairwise_cos"]
    assert same["min"] == pytest.approx(1.0, abs=1e-5)


def test_pretrain_on_the_toy_world_logs_the_matched_vs_swapped_signal(toy, tmp_path):
    out, _, _ = toy
    cfg = pretrain.Config(preset="toy", base=os.path.join(out, "sd"), clip=os.path.join(out, "clip-h"),
                          data=os.path.join(out, "train"), out=str(tmp_path / "run"), steps=2, batch_size=2,
                          num_workers=0, warmup_steps=1, val_every=1, val_views=2,
                          val_images=os.path.join(out, "heldout") + "," + os.path.join(out, "concepts"))
    pretrain.main(cfg)
    recs = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    val = [r for r in recs if r.get("event") == "val"]
    assert [(r["step"], os.path.basename(r["images"])) for r in val] == [
        (1, "heldout"), (1, "concepts"), (2, "heldout"), (2, "concepts")]
    for r in val:
        assert r["n"] == (24 if r["images"].endswith("heldout") else 12)
        assert r["gap"] == pytest.approx(r["swapped"] - r["matched"], abs=1e-6)
        assert r["gap_se"] >= 0 and r["v_norm"] > 0 and r["delta_w_norm"] >= 0
        # Collapse, in every validation: how alike the n v* are, and what they read as.
        assert -1 <= r["v_pairwise_cos"] <= 1 and sum(r["top_words"].values()) <= r["n"]
        assert len(r["words"]) == r["n"] and all(len(w) == 3 for w in r["words"].values())
        assert set(r["top_words"]) <= {w[0] for w in r["words"].values()}
        # The concepts (cross_01.png, ...: two of each class) split the gap by class noun; the
        # held-out pictures' names (00_ring_white_small.png, ...) have no noun: no split.
        split = {"gap_other_class", "gap_other_class_se", "n_other_class", "gap_same_class", "gap_same_class_se",
                 "n_same_class"}
        if r["images"].endswith("concepts"):
            assert split <= set(r) and r["n_other_class"] == r["n_same_class"] == 12
        else:
            assert not split & set(r)
    assert sorted(os.listdir(tmp_path / "run" / "val")) == [
        "step_0000001.png", "step_0000001_concepts.png", "step_0000002.png", "step_0000002_concepts.png"]
    ckpt = model.load_encoder_checkpoint(str(tmp_path / "run" / "encoder.pt"))
    assert ckpt["preset"] == "toy" and ckpt["base"] == os.path.join(out, "sd")


def test_the_readmes_toy_sequence_uses_only_flags_the_scripts_have():
    """The README's one command sequence for the toy world, parsed (not run) by each script."""
    import shlex

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = readme.split("<!-- toy-sequence -->")[1].split("```bash")[1].split("```")[0]
    env = {"reg": "contrastive"}
    parsed = []
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        if "=" in line and line.split("=")[0].isidentifier():  # COMMON="..." / EV="..."
            name, value = line.split("=", 1)
            env[name] = shlex.split(value)[0]
        elif line.startswith("python "):
            words = shlex.split(line)
            for k, v in sorted(env.items(), key=lambda kv: -len(kv[0])):  # $COMMON before a shorter name
                words = [w for word in words
                         for w in (shlex.split(v) if word == "$" + k else [word.replace("$" + k, v)])]
            module = {"toyworld.py": toyworld, "pretrain.py": pretrain, "evaluate.py": evaluate}[words[1]]
            cfg = module.parse_args(words[2:])
            parsed.append((words[1], cfg))
    assert [s for s, _ in parsed] == ["toyworld.py"] + ["pretrain.py"] * 3 + ["evaluate.py"] * 2
    pre = parsed[1][1]
    assert pretrain.val_folders(pre) == ["runs/toyworld/heldout", "runs/toyworld/concepts"]
    assert pre.preset == "toy" and pre.steps == 2000 and pre.embedding_reg == "contrastive"
    assert pre.contrastive_from == 1500 and pre.lambda_contrastive == 1e-3 and pre.val_views == 16
    assert pre.t_min == 400  # Eq. (1)'s t from [400, 1000) in every pre-training of the sequence
    # Eq. (4) at the toy's weight in every pre-training (the Sec. 5.2 variants included)
    assert {cfg.lambda_embedding for s, cfg in parsed if s == "pretrain.py"} == {1e-4}
    nohyper = parsed[3][1]  # the Sec. 5.4 encoder differs from the method's only in the hypernetwork
    assert nohyper.hypernet is False
    assert (nohyper.embedding_reg, nohyper.contrastive_from, nohyper.lambda_contrastive, nohyper.t_min) == (
        "contrastive", 1500, 1e-3, 400)
    assert parsed[4][1].variants == "paper"
    # The toy is evaluated at the guidance its competence drawings were measured at.
    assert parsed[4][1].guidance == toyworld.Config().competence_guidance == parsed[5][1].guidance


def test_the_text_encoder_keeps_only_the_words_its_captions_used(toy):
    """A row the captions never trained is zeroed (a row of zeros is no word), so v*'s nearest
    words, Eq. (3)'s positives and v*'s starting norm come from the words the model knows."""
    out, _, _ = toy
    comps = model.load_components("toy", base=os.path.join(out, "sd"), with_image_encoder=False)
    words = set(model.word_rows(comps.token_table).nonzero().flatten().tolist())
    assert words == toyworld.caption_token_ids(comps.tokenizer) and 35 < len(words) < 50
    vocab = {comps.tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in words}
    assert set(toyworld.CLASSES) | set(toyworld.BACKGROUNDS) | set(toyworld.SIZES) <= vocab
    assert not {toyworld.PATTERNS[0], toyworld.COLOUR_NAMES[0]} & vocab  # the instance is never named
    v = torch.randn(32, comps.cfg.token_dim, generator=torch.Generator().manual_seed(0))
    assert all(w in vocab for row in model.nearest_words(comps.tokenizer, comps.token_table, v, k=5) for w, _ in row)
    real = [i for i in words if i not in model.SPECIAL_IDS]
    assert model.typical_token_norm(comps.token_table) == pytest.approx(
        comps.token_table[real].norm(dim=-1).median().item(), rel=1e-6)


def test_the_text_encoder_is_the_text_tower_of_a_world_clip(toy):
    """As SD 1.5's text encoder is OpenAI CLIP's text tower, the toy's is clip-l's: a CLIPTextModel
    whose hidden states equal those of the open_clip tower it was converted from."""
    out, _, _ = toy
    clip = model.open_clip_model("ViT-L-14", os.path.join(out, "clip-l"), "cpu", file_quick_gelu=True).eval()
    comps = model.load_components("toy", base=os.path.join(out, "sd"), with_image_encoder=False)
    ids = comps.tokenizer(["a photo of a large star on a red background", "a rendering of a heart", ""],
                          padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        x = clip.ln_final(clip.transformer(clip.token_embedding(ids) + clip.positional_embedding,
                                           attn_mask=clip.attn_mask))
        assert torch.allclose(comps.text_encoder(ids).last_hidden_state, x, atol=1e-5)


def test_clip_twins_differ_in_one_named_factor_and_are_never_an_evaluation_instance():
    insts, unseen = toyworld.train_instances(), toyworld.unseen_combinations()
    assert {(i.cls, i.pattern, i.colour1, i.colour2) for i in toyworld.eval_instances(toyworld.N_CONCEPTS)} <= unseen
    rng = random.Random(0)
    for k in range(200):
        factor = ("class", "details")[k % 2]
        (first, bg, size, place), *twins = toyworld.clip_twins(rng, insts, unseen, factor)
        assert first in insts
        changed = []
        for twin, bg2, size2, place2 in twins:
            assert (bg2, size2, place2) == (bg, size, place) and (twin.period, twin.angle) == (first.period, first.angle)
            assert (twin.cls, twin.pattern, twin.colour1, twin.colour2) not in unseen
            changed.append({f for f in ("cls", "pattern", "colour1", "colour2") if getattr(twin, f) != getattr(first, f)})
        if factor == "class":  # the same object in each of the other five classes
            assert changed == [{"cls"}] * 5 and {first.cls} | {t.cls for t, *_ in twins} == set(toyworld.CLASSES)
        else:  # in another pattern, then in two other pairs of colours
            assert changed[0] == {"pattern"} and all(c and c <= {"colour1", "colour2"} for c in changed[1:])
            assert twins[1][0] != twins[2][0]


def test_the_judge_is_scored_against_the_worlds_truth_and_the_concepts_carry_their_labels(toy, monkeypatch):
    out, _, _ = toy
    judge = toyworld.load_judge(os.path.join(out, "judge.pt"))
    scenes = toyworld.test_scenes(6)
    for v in judge.read([im for *_, im in scenes]):  # a verdict names one option of every factor
        assert v["class"] in toyworld.CLASSES and v["pattern"] in toyworld.PATTERNS and v["size"] in toyworld.SIZES
        assert v["background"] in toyworld.BACKGROUNDS and len(v["colours"]) == 2 and v["colours"] <= set(toyworld.COLOURS)
    truths = [{f: toyworld.truth(i, bg, size, f) for f in toyworld.CLIP_FACTORS} for i, bg, size, _ in scenes]
    monkeypatch.setattr(judge, "read", lambda images: [dict(t) for t in truths])
    assert all(s["mean"] == 1 for s in toyworld.judge_accuracy(judge, scenes).values())
    wrong = [dict(t, colours=frozenset(("orange", "no colour"))) for t in truths]  # every pair wrong
    monkeypatch.setattr(judge, "read", lambda images: wrong)
    acc = toyworld.judge_accuracy(judge, scenes)
    assert acc["colours"]["mean"] == 0 and acc["class"]["mean"] == 1
    labels = json.load(open(os.path.join(out, "concepts", "labels.json")))
    assert sorted(labels) == sorted(f for f in os.listdir(os.path.join(out, "concepts")) if f.endswith(".png"))
    for name, inst in zip(sorted(labels, key=lambda n: n.split("_")[1]), toyworld.eval_instances(toyworld.N_CONCEPTS)):
        assert labels[name] == {"class": inst.cls, "pattern": inst.pattern,
                                "colours": sorted((inst.colour1, inst.colour2))}


def test_evaluate_scores_each_variant_with_the_judge(toy, tmp_path):
    """evaluate.py on the toy world: the judge's columns are its reading of the generated images
    against the concept's labels (class, pattern, colours) and the prompt's words (background, size)."""
    import shutil

    out, _, _ = toy
    photos = tmp_path / "photos"
    photos.mkdir()
    labels = json.load(open(os.path.join(out, "concepts", "labels.json")))
    first = sorted(labels)[:2]
    for f in first:
        shutil.copy(os.path.join(out, "concepts", f), photos / f)
    json.dump({f: labels[f] for f in first}, open(photos / "labels.json", "w"))
    (tmp_path / "p.txt").write_text("a photo of a small S* on a red background\n")
    cfg = evaluate.Config(images=str(photos), prompts=str(tmp_path / "p.txt"), encoder="random", preset="toy",
                          base=os.path.join(out, "sd"), clip=os.path.join(out, "clip-h"),
                          eval_clip=os.path.join(out, "clip-b"), variants="full", num_images=2, steps=2, tune_steps=1,
                          batch_size=2, out=str(tmp_path / "eval"), device="cpu")
    rep = evaluate.main(cfg)
    s = rep["summary"]["full"]
    assert set(s["judge"]) == {"class", "pattern", "colours", "background", "size"}
    judge = toyworld.load_judge(os.path.join(out, "judge.pt"))
    cells = []
    for f in first:
        cell = rep["variants"]["full"][f[:-4]]["prompts"]["a photo of a small S* on a red background"]
        verdicts = judge.read([Image.open(tmp_path / "eval" / p) for p in cell["images"]])
        want = {"class": labels[f]["class"], "background": "red", "size": "small"}
        assert cell["judge"]["class"] == sum(v["class"] == want["class"] for v in verdicts) / 2
        assert cell["judge"]["background"] == sum(v["background"] == "red" for v in verdicts) / 2
        cells.append(cell["judge"]["size"])
    assert s["judge"]["size"]["mean"] == pytest.approx(sum(cells) / 2)
    assert sum(s["hard_tokens"].values()) == 2 and s["noun_in_3_nearest"]["n"] == 2 and -1 <= s["v_pairwise_cos"] <= 1
    table = open(tmp_path / "eval" / "metrics.md").read()
    assert "judge: class" in table and "hard tokens" in table
    # full tunes from the encoder: how far v* moved and how many hard tokens tuning changed.
    per = rep["variants"]["full"].values()
    assert s["n_tuned"] == 2 and s["token_changed"] == sum(c["start_token"] != c["token"] for c in per) == 0
    assert s["nearest_changed"] == sum(c["start_token"] != c["nearest_words"][0][0] for c in per)
    assert s["v_shift"]["mean"] == pytest.approx(sum(c["v_shift"] for c in per) / 2) and s["v_shift"]["mean"] > 0
    assert "hard token changed by tuning" in table and "v*'s nearest word changed by tuning" in table


def test_the_judge_also_learns_from_objects_drawn_in_other_colours_and_outlines():
    """restyled_renders (a third of the judge's training, and a competence line): the world's
    shapes in any colour at least 100 from the background, a third in one flat colour, with other
    outlines; where the object is solid (the middle of a square), the picture wears the drawn
    colour, not the palette's; and a fatter outline covers more of the picture."""
    insts = [toyworld.Instance("square", "striped", "orange", "cyan", 0.3, 0.0)] * 30
    scenes = toyworld.restyled_renders(insts, 30, seed=5)
    again = toyworld.restyled_renders(insts, 30, seed=5)
    assert [toyworld._u8(s[-1]).tolist() for s in scenes] == [toyworld._u8(s[-1]).tolist() for s in again]
    assert 5 <= sum(flat for _, _, _, flat, _ in scenes) <= 15
    palette = [toyworld.COLOURS[c] for c in toyworld.COLOURS]
    off_palette = 0
    for _, bg, size, flat, im in scenes:
        x = toyworld._u8(im).float()
        mid = x[:, 14:18, 14:18].reshape(3, -1).T  # inside the square, whatever its jitter
        assert all(math.dist(p.tolist(), toyworld.BACKGROUNDS[bg]) >= 60 for p in mid)
        if flat:
            assert (mid.max(0).values - mid.min(0).values).max() <= 2  # one colour, no pattern
        off_palette += all(math.dist(mid[0].tolist(), c) > 30 for c in palette)
    assert off_palette >= 25
    star = toyworld.Instance("star", "two-tone", "black", "black", 0.3, 0.0)

    def covered(style):
        im = toyworld._u8(toyworld.render(star, "white", "large", random.Random(1), style=style)).float()
        return int(((im - 240).abs().sum(0) > 60).sum())

    assert covered({}) < covered({"grow": 4}) < covered({"grow": 4, "scale": 1.2})
    assert covered({"grow": -2}) < covered({})


def test_schedule_runs_the_lanes_side_by_side_and_a_stage_after_what_it_needs():
    """The build's time from its stages' times, as build() runs them: world, then the two lanes
    side by side (the VAE and t2i in one, the CLIPs and the judge in the other; t2i starts when
    the VAE and clip-l have ended, the judge when the VAE has), then competence; --jobs 1 runs
    them one after the other, each after what it needs, and adds them all up."""
    secs = {"world": 1, "vae": 10, "judge": 5, "clip-h": 5, "clip-b": 5, "clip-l": 20, "t2i": 30, "competence": 2}
    total, end = toyworld.schedule(secs, jobs=2)
    assert (end["vae"], end["clip-l"], end["t2i"], end["clip-b"], end["judge"], total) == (11, 21, 51, 31, 36, 53)
    total, end = toyworld.schedule({**secs, "vae": 30}, jobs=2)
    assert (end["t2i"], end["judge"], total) == (61, 36, 63)  # t2i waited for the VAE
    total, end = toyworld.schedule({**secs, "vae": 40}, jobs=2)
    assert (end["clip-b"], end["judge"], end["t2i"], total) == (31, 46, 71, 73)  # so did the judge
    total, end = toyworld.schedule(secs, jobs=1)
    assert total == sum(secs.values()) == 78
    assert toyworld.in_order(toyworld.PLAN[1]) == ["vae", "clip-l", "t2i", "clip-h", "clip-b", "judge"]
    with pytest.raises(ValueError, match="never runs"):
        toyworld.in_order([["t2i", "clip-l"]])  # t2i before clip-l, in one lane


def test_data_pass_runs_a_tenth_under_benchmark_and_extrapolates_the_rest(monkeypatch):
    assert list(toyworld.data_pass(2_000, 100)) == list(range(0, 2_000, 100))
    monkeypatch.setattr(toyworld, "BENCH", {"steps": 1, "record": {}})
    done = []
    for i in toyworld.data_pass(2_000, 100):  # 20 chunks: the first 2 run
        time.sleep(0.05)
        done.append(i)
    assert done == [0, 100]
    # 0.1 s for 2 chunks: the other 18 would take 0.9 s
    assert 0.85 <= toyworld.BENCH["record"]["extrapolated_s"] < 1.5


def test_benchmark_predicts_the_build_from_a_few_timed_steps_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "not-made"
    cfg = toyworld.Config(out=str(out), n_train=64, vae_steps=300, clip_steps=7, metric_clip_steps=9,
                          text_clip_steps=11, t2i_steps=13, batch_size=4, clip_batch_size=8, judge_steps=5,
                          judge_batch_size=4, competence_per_class=1, competence_steps=2, competence_renders=8,
                          jobs=1, benchmark=True, benchmark_steps=1)
    rep = toyworld.main(cfg)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rep
    assert not out.exists()  # built in a temporary folder, not in --out
    steps = {"vae": 300, "judge": 5, "clip-h": 7, "clip-b": 9, "clip-l": 11, "t2i": 13}
    assert set(rep["stages"]) == set(toyworld.STAGES)
    for s, row in rep["stages"].items():
        assert row["predicted_s"] == pytest.approx(row["other_s"] + row.get("training_s", 0), abs=0.11)
        if s in steps:  # a training stage: predicted from its timed steps, not from what it ran
            assert row["steps"] == steps[s] and row["gflop_per_step"] > 0 and row["s_per_step"] > 0
            assert row["training_s"] == pytest.approx(row["s_per_step"] * steps[s], abs=0.06)
    assert rep["stages"]["vae"]["predicted_s"] > rep["stages"]["vae"]["measured_s"]  # 300 steps, 3 run
    total, _ = toyworld.schedule({s: r["predicted_s"] for s, r in rep["stages"].items()}, jobs=1)
    assert rep["predicted_min"] == round(total / 60, 1)
    assert rep["budget_min"] == toyworld.BUDGET_MIN == 45
    assert rep["within_budget"] == (total <= 45 * 60)
    with pytest.raises(cmdline.UserError, match="--benchmark times every stage"):
        toyworld.parse_args(["--benchmark", "--stage", "vae"])
