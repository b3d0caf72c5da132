"""evaluate.py: CLIP-I / CLIP-T, the end-to-end run, caching, bad input."""
import json
import os

import open_clip
import pytest
import torch
from PIL import Image

import cmdline
import data
import evaluate
import tune


@pytest.fixture(scope="module")
def metric():
    return evaluate.ClipMetric("tiny", torch.device("cpu"))


def test_clip_identity_of_an_image_with_itself_is_one_and_symmetric(metric):
    a, b = data.synthetic_image(0, size=96), data.synthetic_image(1, size=96)
    assert abs(metric.identity(a, [a]) - 1.0) < 1e-5
    assert abs(metric.identity(a, [b]) - metric.identity(b, [a])) < 1e-6
    assert metric.identity(a, [b]) < 0.999
    # The mean over several generated images is the mean of the single cosines.
    both = metric.identity(a, [a, b])
    assert abs(both - (1.0 + metric.identity(a, [b])) / 2) < 1e-5


def test_clip_t_scores_the_prompt_with_the_class_noun(metric):
    assert evaluate.noun_prompt("a photo of S* in the gladiator movie", "dog") == "a photo of dog in the gladiator movie"
    img = data.synthetic_image(2, size=64)
    s = metric.prompt_similarity([img], "a photo of dog on the beach")
    assert metric.last_texts == ["a photo of dog on the beach"]
    # By hand: the cosine of the two towers' embeddings, the image at the tower's input size, CLIP mean/std.
    size = metric.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad():
        im = metric.model.encode_image(data.clip_tensor(data.centre_square(img), size)[None])
        tx = metric.model.encode_text(open_clip.get_tokenizer("ViT-B-16")(["a photo of dog on the beach"]))
    want = torch.nn.functional.cosine_similarity(im, tx).item()
    assert abs(s - want) < 1e-5 and abs(s) < 1
    assert abs(metric.prompt_similarity([img], "an oil painting of dog") - s) > 1e-4  # the text matters


def test_class_nouns_from_csv_or_file_stem(tmp_path):
    (tmp_path / "classes.csv").write_text("file,noun\nx_1.png,backpack\n")
    assert data.class_nouns(str(tmp_path), ["dog_02.jpg", "x_1.png", "123.png"]) == {
        "dog_02.jpg": "dog", "x_1.png": "backpack", "123.png": "object"}


def _eval_set(tmp_path):
    imgs = tmp_path / "set"
    imgs.mkdir()
    data.synthetic_image(0, size=96).save(imgs / "dog_01.png")
    data.synthetic_image(1, size=96).save(imgs / "teapot_02.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of S* on the beach\n\nan oil painting of S*\n")
    return imgs, prompts


def test_end_to_end_writes_metrics_table_plot_and_reuses_the_cache(tmp_path, monkeypatch):
    imgs, prompts = _eval_set(tmp_path)
    out = tmp_path / "eval"
    fed = []
    orig = evaluate.ClipMetric.text_features
    monkeypatch.setattr(evaluate.ClipMetric, "text_features", lambda self, t: (fed.extend(t), orig(self, t))[1])
    seeds, generate = [], evaluate.sample.generate
    monkeypatch.setattr(evaluate.sample, "generate", lambda *a, **kw: (seeds.append((a[3], kw["seed"])), generate(*a, **kw))[1])
    args = ["--images", str(imgs), "--prompts", str(prompts), "--preset", "tiny", "--encoder", "random",
            "--variants", "full,no_dual_path", "--num-images", "1", "--steps", "3", "--tune-steps", "1",
            "--batch-size", "2", "--out", str(out), "--device", "cpu"]
    assert evaluate.cli(args) == 0
    # Each concept draws each prompt from its own seed; both variants of a concept from the same.
    want = {(p, evaluate.drawing_seed(evaluate.Config(), f, j)) for f in ("dog_01.png", "teapot_02.png")
            for j, p in enumerate(["a photo of S* on the beach", "an oil painting of S*"])}
    assert sorted(seeds) == sorted(list(want) * 2) and len({s for _, s in want}) == 4
    assert sorted(fed) == sorted(["a photo of dog on the beach", "an oil painting of dog",
                                  "a photo of teapot on the beach", "an oil painting of teapot"] * 2)
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["summary"]) == {"full", "no_dual_path"}
    for variant, s in rep["summary"].items():  # mean +- SE over the concept x prompt cells
        cells = [c for concept in rep["variants"][variant].values() for c in concept["prompts"].values()]
        assert len(cells) == s["identity"]["n"] == s["prompt"]["n"] == 4
        for key in ("identity", "prompt"):
            assert s[key] == pytest.approx(cmdline.mean_se([c[key] for c in cells]), rel=1e-9)
        assert s["identity"]["se"] > 0 and 0 < s["identity"]["mean"] < 1 and abs(s["prompt"]["mean"]) < 1
    cell = rep["variants"]["full"]["dog_01"]["prompts"]["a photo of S* on the beach"]
    assert cell["text"] == "a photo of dog on the beach" and {"identity", "prompt", "images"} <= set(cell)
    assert rep["variants"]["no_dual_path"]["teapot_02"]["noun"] == "teapot"
    assert rep["reused"] == {"concepts": 0, "images": 0}
    md = (out / "metrics.md").read_text()
    assert "| variant | identity (CLIP-I) | prompt (CLIP-T) |" in md and "| no_dual_path |" in md
    # no_dual_path against full, paired by concept: the mean of the two concepts' differences.
    ident = {v: [sum(c["identity"] for c in rep["variants"][v][k]["prompts"].values()) / 2 for k in ("dog_01", "teapot_02")]
             for v in ("full", "no_dual_path")}
    d = [a - b for a, b in zip(ident["no_dual_path"], ident["full"])]
    assert rep["summary"]["no_dual_path"]["vs_full"]["identity"] == pytest.approx(cmdline.mean_se(d), rel=1e-9)
    assert "vs_full" not in rep["summary"]["full"] and "| variant - full | CLIP-I | CLIP-T |" in md
    png = out / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    assert len(os.listdir(out / "images" / "full" / "dog_01")) == 2

    # Second run: every concept and image comes from disk, untouched; same numbers.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert evaluate.cli(args) == 0
    rep2 = json.loads((out / "metrics.json").read_text())
    assert rep2["reused"] == {"concepts": 4, "images": 8}
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes
    # A changed setting is not served from the cache: more tuning steps re-tune and re-generate.
    args[args.index("--tune-steps") + 1] = "2"
    assert evaluate.cli(args) == 0
    assert json.loads((out / "metrics.json").read_text())["reused"] == {"concepts": 0, "images": 0}
    assert rep2["summary"]["full"]["identity"]["mean"] == pytest.approx(rep["summary"]["full"]["identity"]["mean"], abs=1e-6)


def test_tune_settings_reach_the_tuning_and_the_cache_key():
    """--tune-lr, --tune-steps and --lambda-anchor are the DATE variants' tune.py settings (not
    no_tuning's steps), and a concept cached under other settings is not reused."""
    cfg = evaluate.Config(encoder="e.pt", tune_lr=0.02, tune_steps=5, lambda_anchor=0.0)
    tc = evaluate.variant_config(cfg, "full", "x.png")
    assert (tc.lr, tc.steps, tc.lambda_anchor) == (0.02, 5, 0.0)
    assert evaluate.variant_config(cfg, "no_tuning", "x.png").steps == 0
    default = evaluate.variant_settings(evaluate.Config(encoder="e.pt"), "full")
    assert default["lr"] == tune.Config.lr and evaluate.variant_settings(cfg, "full")["lr"] == 0.02


def test_baselines_tune_at_their_references_batch_and_date_at_its_own():
    """The one-image baselines train on 4 views a step (their references: 1 image x 4 accumulation
    steps), the DATE variants on --batch-size (16); each flag reaches only its own variants and the
    cache key, so a concept tuned at another batch is not reused."""
    cfg = evaluate.Config(encoder="e.pt")
    batches = [evaluate.variant_settings(cfg, v)["batch_size"] for v in ("full", "textual_inversion", "lora")]
    assert batches == [16, 4, 4]
    cfg = evaluate.Config(encoder="e.pt", batch_size=8, baseline_batch_size=2)
    assert [evaluate.variant_settings(cfg, v)["batch_size"] for v in ("no_dual_path", "textual_inversion", "lora")] \
        == [8, 2, 2]
    assert evaluate.variant_config(cfg, "full", "x.png").batch_size == 8


@pytest.mark.parametrize("case", ["empty_folder", "missing_prompts", "no_placeholder", "bad_variant", "bad_tune_lr",
                                  "bad_baseline_batch"])
def test_bad_input_exits_2_with_one_line(tmp_path, case, capsys):
    imgs, prompts = _eval_set(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "plain.txt").write_text("a photo of S*\na photo of a dog\n")
    args = {"empty_folder": ["--images", str(empty)],
            "missing_prompts": ["--images", str(imgs), "--prompts", str(tmp_path / "nope.txt")],
            "no_placeholder": ["--images", str(imgs), "--prompts", str(tmp_path / "plain.txt")],
            "bad_variant": ["--images", str(imgs), "--variants", "full,nonsense"],
            "bad_tune_lr": ["--images", str(imgs), "--tune-lr", "0"],
            "bad_baseline_batch": ["--images", str(imgs), "--baseline-batch-size", "0"]}[case]
    assert evaluate.cli(args + ["--preset", "tiny", "--encoder", "random", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("evaluate.py: error:")
    assert not (tmp_path / "o").exists()


def test_jobs_2_workers_give_the_numbers_and_pictures_of_one_thread(tmp_path):
    """--jobs 2 tunes and draws in two one-thread worker processes, then scores in the main one:
    every concept, picture and score equals a --jobs 1 run on one thread, including a baseline."""
    imgs, prompts = _eval_set(tmp_path)
    base = ["--images", str(imgs), "--prompts", str(prompts), "--preset", "tiny", "--encoder", "random",
            "--variants", "full,textual_inversion", "--num-images", "1", "--steps", "2", "--tune-steps", "1",
            "--ti-steps", "2", "--batch-size", "2", "--baseline-batch-size", "2", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate.cli(base + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert evaluate.cli(base + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for variant in ("full", "textual_inversion"):
        for stem in ("dog_01", "teapot_02"):
            a, b = one["variants"][variant][stem], two["variants"][variant][stem]
            assert [c["identity"] for c in a["prompts"].values()] == [c["identity"] for c in b["prompts"].values()]
            assert [c["images"] for c in a["prompts"].values()] == [c["images"] for c in b["prompts"].values()]
            for rel in (p for c in a["prompts"].values() for p in c["images"]):
                assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()
            ca, cb = (torch.load(tmp_path / d / "concepts" / variant / f"{stem}.pt", weights_only=True)
                      for d in ("one", "two"))
            assert torch.equal(ca["v_star"], cb["v_star"])
    assert two["reused"] == {"concepts": 0, "images": 0}  # the workers' fresh work, not the scoring pass's reuse
    assert two["summary"]["full"]["identity"] == one["summary"]["full"]["identity"]


def test_paired_with_full_is_the_mean_and_se_of_per_concept_differences():
    """Each concept is averaged over its prompts first; a concept only one variant has, or a judge
    field a cell lacks, is left out; with one concept there is no SE, so no comparison."""
    def concept(idents, classes):
        return {"prompts": {f"p{j}": {"identity": i, "prompt": 0.5, "judge": {} if c is None else {"class": c}}
                            for j, (i, c) in enumerate(zip(idents, classes))}}
    results = {"full": {"a": concept([0.2, 0.4], [1.0, 0.0]), "b": concept([0.5, 0.5], [1.0, 1.0]),
                        "c": concept([0.1, 0.3], [None, None])},
               "no_tuning": {"a": concept([0.1, 0.1], [0.0, 0.0]), "b": concept([0.6, 0.6], [1.0, None]),
                             "c": concept([0.3, 0.3], [None, None]), "extra": concept([0.9, 0.9], [1.0, 1.0])}}
    got = evaluate.paired_with_full(results, ["class"])
    assert set(got) == {"no_tuning"}
    assert got["no_tuning"]["identity"] == pytest.approx(cmdline.mean_se([0.1 - 0.3, 0.6 - 0.5, 0.3 - 0.2]))
    assert got["no_tuning"]["prompt"]["mean"] == pytest.approx(0.0) and got["no_tuning"]["prompt"]["se"] == pytest.approx(0.0)
    assert got["no_tuning"]["class"] == pytest.approx(cmdline.mean_se([0.0 - 0.5, 1.0 - 1.0]))  # c has no class
    assert evaluate.paired_with_full({"full": {"a": concept([0.2], [1.0])}, "lora": {"a": concept([0.3], [1.0])}},
                                     []) == {}
    assert evaluate.paired_with_full({"no_tuning": results["no_tuning"]}, []) == {}


def test_a_misspelt_hard_token_is_refused_from_python_too(tmp_path):
    """The CLI's choices reject a bad --hard-token; a Python caller of main() gets the same one-line
    error, not the "tuned" rule by default, and nothing is written."""
    imgs, _ = _eval_set(tmp_path)
    cfg = evaluate.Config(images=str(imgs), preset="tiny", encoder="random", out=str(tmp_path / "o"), hard_token="kept",
                          variants="full", num_images=1, steps=1, tune_steps=1, batch_size=2, device="cpu")  # quick if not refused
    with pytest.raises(cmdline.UserError, match="--hard-token must be one of encoder, tuned"):
        evaluate.main(cfg)
    assert not (tmp_path / "o").exists()


def test_jobs_below_one_is_one_line(tmp_path, capsys):
    imgs, prompts = _eval_set(tmp_path)
    args = ["--images", str(imgs), "--preset", "tiny", "--encoder", "random", "--out", str(tmp_path / "o"), "--jobs", "0"]
    assert evaluate.cli(args) == 2
    assert "--jobs must be positive" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_image_key_changes_with_anything_that_changes_the_pixels():
    # A cached picture is reused only for the same concept: v*, its hard token (the dual path's
    # original branch draws it), every LoRA weight, alpha, the LoRA scale, the prompt, the sampler.
    g = torch.Generator().manual_seed(0)
    c = {"v_star": torch.randn(8, generator=g), "token_id": 5, "alpha_blend": 0.25, "lora_scale": 1.0,
         "final_loss": 0.1, "lora_A": {"a": torch.randn(8, 2, generator=g), "b": torch.randn(8, 2, generator=g)},
         "lora_B": {"a": torch.randn(2, 8, generator=g), "b": torch.randn(2, 8, generator=g)}}
    cfg = evaluate.Config()
    key = evaluate.image_key(c, "a photo of S*", cfg, 0)
    copy = {**c, "lora_A": {k: t.clone() for k, t in c["lora_A"].items()}}
    assert evaluate.image_key(copy, "a photo of S*", cfg, 0) == key
    changed_b = {**c, "lora_B": {**c["lora_B"], "b": c["lora_B"]["b"] + 1e-3}}
    for other in ({**c, "token_id": 6}, changed_b, {**c, "alpha_blend": 1.0}, {**c, "lora_scale": 0.5}):
        assert evaluate.image_key(other, "a photo of S*", cfg, 0) != key
    assert evaluate.image_key(c, "a photo of S* on a red background", cfg, 0) != key


def test_each_concept_draws_with_noises_of_its_own_and_every_variant_with_the_same():
    # The variants of one concept are paired (same seed); two concepts, or two prompts, are not:
    # otherwise a table of 12 concepts holds the noises of one, and what the noise decides (the
    # toy's background and colours) is measured on a handful of draws.
    cfg = evaluate.Config(seed=3)
    files = [f"{c}_{k:02d}.png" for c in ("cross", "heart", "ring") for k in range(4)]
    seeds = {(f, j): evaluate.drawing_seed(cfg, f, j) for f in files for j in range(4)}
    assert len(set(seeds.values())) == len(seeds)  # 48 distinct
    assert all(abs(a - b) >= 1000 for a in seeds.values() for b in seeds.values() if a != b)  # image k = seed + k
    assert evaluate.drawing_seed(cfg, "some/dir/cross_00.png", 1) == seeds[("cross_00.png", 1)]  # by file name
    assert evaluate.drawing_seed(evaluate.Config(seed=4), "cross_00.png", 1) == seeds[("cross_00.png", 1)] + 1
    g = torch.Generator().manual_seed(0)
    c = {"v_star": torch.randn(8, generator=g), "token_id": 5, "alpha_blend": 0.25, "lora_scale": 1.0,
         "lora_A": {}, "lora_B": {}}
    assert evaluate.image_key(c, "a photo of S*", cfg, 11) != evaluate.image_key(c, "a photo of S*", cfg, 12)
