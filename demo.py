"""
demo.py -- personalise in a browser: one photo, the tuning steps live, Eq. (5)'s alpha on a slider.

    python demo.py --preset toy                 # the toy world's encoder (runs/toy/contrastive/encoder.pt)
    python demo.py --preset sd15 --encoder runs/pretrain/encoder.pt
    python demo.py --preset tiny                # random weights: the page works, the pictures mean nothing
    python demo.py --benchmark                  # one JSON line: start-up, personalise, generate times

A Gradio page (http://127.0.0.1:7860 unless --host / --port say otherwise; no public share link
unless --share) over the project's own functions -- tune.tune_concept (the encoder forward and
the <= 12 tuning steps of Sec. 4.4), sample.generate (the dual path of Eq. 5) and export.export
-- so that what the page shows is exactly what the command-line scripts do:

  1. Concept: drop a photo (or click an example), choose the tuning steps (0-12), Personalise. The
     loss of each step is drawn as it comes; then v*'s nearest words (Sec. 4.2: the first is the
     hard token of C_h) and the time.
  2. Generate: a prompt with S*, alpha (Eq. 5: 0 = the vanilla path with the hard token only,
     1 = the personalised path only), guidance, DDIM steps, seed, images. "Compare" shows, with the
     same seeds: the base model with S* replaced by the hard token, the concept at alpha = 1, and
     the concept at the chosen alpha.
  3. Take it home: the concept file (for sample.py) and a zip of export.py's files.

One job runs at a time (a visible queue); Cancel stops tuning or sampling within a step. Bad
input (an image that does not load, a prompt without S* or with S* past token 75) is shown as the
same one line the scripts print, never a traceback, and the page keeps serving.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import queue as queue_lib
from dataclasses import dataclass

import cmdline
import model

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "concept.png")
DEFAULT_ENCODERS = {"toy": "runs/toy/contrastive/encoder.pt", "sd15": "runs/pretrain/encoder.pt",
                    "sd15-arch": "random", "tiny": "random"}


@dataclass
class Config:
    preset: str = "toy"  # toy (the CPU world), sd15 (real weights), tiny / sd15-arch (random weights)
    encoder: str | None = None  # pretrain.py checkpoint or "random"; default per preset (see DEFAULT_ENCODERS)
    host: str = "127.0.0.1"  # listen here only, unless told otherwise
    port: int = 7860
    share: bool = False  # a public *.gradio.live link (off unless asked)
    base: str | None = None  # sd15 / toy: the base model folder or hub id (default: the preset's)
    clip: str | None = None  # sd15 / toy: the image backbone (default: the preset's)
    device: str | None = None  # default: cuda if available, else cpu
    benchmark: bool = False  # print one JSON line of timings (start-up, personalise, generate) and exit


UserError = cmdline.UserError


def parse_args(argv=None) -> Config:
    p = cmdline.config_parser(Config, __doc__.split("\n\n")[0].strip(), choices={"preset": model.PRESETS})
    return Config(**vars(p.parse_args(argv)))


class Cancelled(Exception):
    """Raised inside a step callback when Cancel was pressed."""


class Demo:
    """The loaded models and the one job that may run at a time. Plain Python, no Gradio: the
    page (build_app) and the benchmark call these methods."""

    def __init__(self, cfg: Config):
        import tune

        self.cfg = cfg
        encoder = cfg.encoder or DEFAULT_ENCODERS[cfg.preset]
        tcfg = tune.Config(encoder=encoder, preset=cfg.preset, **{k: v for k, v in (("base", cfg.base),
                                                                                  ("clip", cfg.clip)) if v})
        self.ckpt, _ = tune.load_encoder_checkpoint(tcfg, prog="demo.py")
        self.device = cmdline.resolve_device(cfg.device)
        self.comps, self.names = tune.load_models(cfg.preset, self.device, tcfg.base, tcfg.clip)
        self.encoder = tune.build_tuning_encoder(self.ckpt, self.comps, self.names, 0, encoder).to(self.device)
        self.encoder_path = encoder
        self.stop = threading.Event()
        self.lock = threading.Lock()  # one job at a time, also for callers outside Gradio's queue
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            import sample

            self._pipe = sample.build_pipeline(self.comps)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def _check_stop(self, *_):
        if self.stop.is_set():
            raise Cancelled()

    def personalise(self, image_path: str, steps: int = 12, seed: int = 0, on_step=None) -> tuple[dict, dict]:
        """tune.tune_concept on one photo: (concept, stats). on_step(step, loss) after each step.
        Raises UserError (bad image, bad steps) or Cancelled."""
        import data as data_lib
        import tune

        if not 0 <= int(steps) <= 12:
            raise UserError(f"--steps must be between 0 and 12 (Sec. 5.1: up to 12), got {steps}")
        if not image_path:
            raise UserError("no image: drop a photo of the concept first")
        try:
            image = data_lib.load_image(image_path)
        except data_lib.BadImage as e:
            raise UserError(str(e)) from None
        tcfg = tune.Config(image=os.path.basename(image_path), encoder=self.encoder_path, preset=self.cfg.preset,
                           steps=int(steps), seed=int(seed))

        def step(i, loss):
            self._check_stop()
            if on_step is not None:
                on_step(i, loss)

        with self.lock:
            self.stop.clear()
            return tune.tune_concept(self.comps, self.encoder, image, tcfg, release_backbone=False,
                                     log=lambda s: None, on_step=step)

    def check_prompt(self, concept: dict | None, prompt: str):
        """The prompt checks sample.py makes, as one-line UserErrors (here S* is required: a
        prompt without it would not show the concept)."""
        if concept is None:
            raise UserError("no concept yet: drop a photo and press Personalise first")
        ph = concept["placeholder"]
        if ph not in prompt:
            raise UserError(f"the prompt does not mention {ph}: write it where the concept goes, "
                            f"e.g. 'a photo of {ph} on the beach'")
        try:
            model.tokenize_with_placeholder(self.comps.tokenizer, [prompt], ph)
        except model.PromptTooLong as e:
            raise UserError(str(e)) from None

    def generate(self, concept: dict | None, prompt: str, alpha: float = 0.25, guidance: float = 7.5,
                 steps: int = 25, seed: int = 0, num_images: int = 4, compare: bool = False, on_step=None):
        """[(PIL image, caption)]: the concept at alpha; with compare, first the base model with the
        hard token and the concept at alpha = 1, same seeds. Raises UserError or Cancelled."""
        import sample

        self.check_prompt(concept, prompt)
        if not 0 <= alpha <= 1:
            raise UserError(f"--alpha-blend must be in [0, 1], got {alpha}")
        if not 1 <= int(steps) <= 1000 or not 1 <= int(num_images) <= 16 or guidance < 0:
            raise UserError("DDIM steps must be 1-1000, images 1-16 and guidance >= 0")
        runs = [("concept, alpha = %.2f" % alpha, concept, prompt, alpha)]
        if compare:
            hard = prompt.replace(concept["placeholder"], concept["token"])
            runs = [(f"base model: {hard!r}", None, hard, None), ("concept, alpha = 1", concept, prompt, 1.0)] + runs
        out = []
        with self.lock:
            self.stop.clear()
            for label, c, p, a in runs:
                ims = sample.generate(self.pipe, self.comps, c, p, num_images=int(num_images), steps=int(steps),
                                      guidance=float(guidance), seed=int(seed), alpha_blend=a,
                                      on_step=lambda i: (self._check_stop(), on_step and on_step(i)))
                out += [(im, f"{label} (seed {int(seed) + k})") for k, im in enumerate(ims)]
        return out

    def take_home(self, concept: dict, folder: str) -> tuple[str, str]:
        """(concept file, zip of export.py's formats), written into `folder`."""
        import export

        stem = "concept"
        path = os.path.join(folder, f"{stem}.pt")
        cmdline.atomic_save(concept, path)
        out = os.path.join(folder, "export")
        export.export(concept, out, list(export.FORMATS), f"<{stem}>", force=True)
        zipped = shutil.make_archive(os.path.join(folder, f"{stem}-export"), "zip", out)
        return path, zipped


def words_markdown(concept: dict, stats: dict, device) -> str:
    words = ", ".join(f"**{w}** {c:.3f}" if i == 0 else f"{w} {c:.3f}"
                      for i, (w, c) in enumerate(concept["nearest_words"]))
    steps = len(stats["losses"])
    return (f"v* reads as: {words}  \n(the first is the hard token of C_h, Sec. 4.2)  \n"
            f"{steps} tuning steps in {stats['total_s']:.2f} s on {cmdline.device_name(device)}")


def examples(preset: str) -> list[str]:
    """The example photos: examples/concept.png and, for toy, the world's evaluation concepts."""
    out = [EXAMPLE]
    folder = os.path.join("runs", "toyworld", "concepts")
    if preset == "toy" and os.path.isdir(folder):
        out += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    return out


def build_app(demo: Demo):
    """The Gradio Blocks page over a Demo."""
    import gradio as gr
    import pandas as pd

    import data as data_lib

    def loss_frame(losses):
        return pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": [float(x) for x in losses]})

    def personalise(image, steps, seed, progress=gr.Progress()):
        # tune_concept runs in a thread; its per-step losses come through a queue so the page can
        # draw them as they arrive. Cancel sets demo.stop, which the next step callback raises on.
        q = queue_lib.Queue()
        result = {}

        def work():
            try:
                result["out"] = demo.personalise(image, steps, seed, on_step=lambda i, loss: q.put((i, loss)))
            except BaseException as e:  # handed to the page's thread below
                result["error"] = e
            q.put(None)

        threading.Thread(target=work, daemon=True).start()
        losses = []
        try:
            while (item := q.get()) is not None:
                losses.append(item[1])
                progress((len(losses), int(steps)), desc="tuning")
                yield loss_frame(losses), f"step {len(losses)}/{int(steps)}: loss {item[1]:.5f}", None, None, None
        finally:
            if not result:  # the page went away or Cancel was pressed mid-run: stop the tuning thread
                demo.stop.set()
        if "error" in result:
            e = result["error"]
            raise gr.Error(str(e) if isinstance(e, UserError) else
                           "cancelled" if isinstance(e, Cancelled) else f"{e.__class__.__name__}: {e}",
                           print_exception=False)
        concept, stats = result["out"]
        folder = tempfile.mkdtemp(prefix="date-demo-")
        path, zipped = demo.take_home(concept, folder)
        yield loss_frame(stats["losses"]), words_markdown(concept, stats, demo.device), concept, path, zipped

    def show_photo(path):
        if not path:
            return None
        try:
            return data_lib.load_image(path)
        except data_lib.BadImage as e:
            raise gr.Error(str(e), print_exception=False)

    def generate(concept, prompt, alpha, guidance, steps, seed, num_images, compare, progress=gr.Progress()):
        total = int(steps) * (3 if compare else 1)
        done = [0]

        def on_step(i):
            done[0] += 1
            progress((done[0], total), desc="sampling")

        try:
            return demo.generate(concept, prompt, alpha, guidance, steps, seed, num_images, compare, on_step)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False)
        except Cancelled:
            raise gr.Error("cancelled", print_exception=False)

    cfg = demo.comps.cfg
    with gr.Blocks(title="DATE: personalise in a browser") as app:
        gr.Markdown("# Domain-Agnostic Tuning-Encoder: one photo, a few tuning steps, a new word S*\n"
                    f"preset **{demo.cfg.preset}** ({cfg.resolution} px), encoder `{demo.encoder_path}`")
        concept_state = gr.State(None)
        with gr.Row():
            with gr.Column():
                # A File, not an Image: Gradio's Image input rejects a bad file with its own error
                # before our code sees it; here data.load_image reads it, with the scripts' messages.
                image = gr.File(label="photo of the concept (any format tune.py reads)", type="filepath")
                preview = gr.Image(label="the photo", interactive=False, height=160)
                gr.Examples(examples=[[p] for p in examples(demo.cfg.preset)], inputs=[image])
                steps = gr.Slider(0, 12, value=12, step=1, label="tuning steps (Sec. 4.4; 0 = the encoder alone)")
                tseed = gr.Number(0, precision=0, label="seed")
                go = gr.Button("Personalise", variant="primary")
            with gr.Column():
                plot = gr.LinePlot(x="step", y="loss", label="tuning loss (Eq. 1 + anchor)", height=220)
                words = gr.Markdown("")
                concept_file = gr.File(label="concept file (python sample.py --concept ...)")
                export_zip = gr.File(label="export.py's files (diffusers, kohya), zipped")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox("a photo of a large S* on a blue background" if demo.cfg.preset == "toy"
                                    else "a photo of S* on the beach", label="prompt (with S*)")
                alpha = gr.Slider(0, 1, value=0.25, step=0.05, label="alpha (Eq. 5)")
                guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="guidance")
                ddim = gr.Slider(1, 100, value=25, step=1, label="DDIM steps")
                gseed = gr.Number(0, precision=0, label="seed")
                n = gr.Slider(1, 8, value=4, step=1, label="images")
                compare = gr.Checkbox(False, label="compare: base model with the hard token | alpha = 1 | alpha")
                gen = gr.Button("Generate", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
            gallery = gr.Gallery(label="samples", columns=4, height="auto", format="png")
        image.change(show_photo, [image], [preview], api_name=False)
        ev1 = go.click(personalise, [image, steps, tseed], [plot, words, concept_state, concept_file, export_zip],
                       api_name="personalise")
        ev2 = gen.click(generate, [concept_state, prompt, alpha, guidance, ddim, gseed, n, compare], [gallery],
                        api_name="generate")
        cancel.click(lambda: demo.stop.set(), None, None, cancels=[ev1, ev2], queue=False, api_name="cancel")
    app.queue(default_concurrency_limit=1)  # one job at a time, the others wait in a visible queue
    return app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def benchmark(cfg: Config):
    """Start-up (until the page answers), personalise (12 steps) and 4 images of 25 DDIM steps."""
    import urllib.request

    t0 = time.perf_counter()
    demo = Demo(cfg)
    app = build_app(demo)
    port = free_port(cfg.host)
    app.launch(server_name=cfg.host, server_port=port, prevent_thread_lock=True, quiet=True)
    urllib.request.urlopen(f"http://{cfg.host}:{port}/", timeout=30).read()
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    concept, stats = demo.personalise(EXAMPLE, 12, 0)
    personalise_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    ims = demo.generate(concept, f"a photo of {concept['placeholder']}", 0.25, 7.5, 25, 0, 4)
    generate_s = time.perf_counter() - t2
    app.close()
    print(json.dumps({"what": "demo", "preset": cfg.preset, "device": cmdline.device_name(demo.device),
                      "startup_s": round(startup, 2), "personalise_s": round(personalise_s, 2),
                      "tune_steps": len(stats["losses"]), "generate_4x25_s": round(generate_s, 2),
                      "images": len(ims)}))


def main(cfg: Config):
    if not 0 < cfg.port < 65536:
        raise UserError(f"--port must be 1-65535, got {cfg.port}")
    if cfg.benchmark:
        return benchmark(cfg)
    demo = Demo(cfg)
    app = build_app(demo)
    print(f"demo.py: serving on http://{cfg.host}:{cfg.port} (Ctrl-C stops)", file=sys.stderr)
    app.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, quiet=True)


def cli(argv=None) -> int:
    return cmdline.run_cli("demo.py", main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
