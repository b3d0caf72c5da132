"""demo.py, driven as people use it: through Gradio's HTTP API (gradio_client) and in a real
headless browser (Debian's chromium, driven by Playwright). tiny preset, CPU, no network."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import demo
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The suite serves the tiny preset. docs/demo.png is this file's browser test run on the toy world:
#   DATE_DEMO_PRESET=toy DATE_DEMO_SCREENSHOT=docs/demo.png pytest tests/test_demo.py -k browser
PRESET = os.environ.get("DATE_DEMO_PRESET", "tiny")
PHOTO = (os.path.join(ROOT, "runs", "toyworld", "concepts", "heart_05.png") if PRESET == "toy" else demo.EXAMPLE)


@pytest.fixture(scope="module")
def served():
    """A Demo and its page, served on 127.0.0.1 on a free port."""
    d = demo.Demo(demo.Config(preset=PRESET))
    app = demo.build_app(d)
    port = demo.free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield d, f"http://127.0.0.1:{port}/"
    app.close()


def test_http_api_personalise_then_generate_shows_tune_concepts_losses_and_images(served, tmp_path):
    from gradio_client import Client, handle_file

    d, url = served
    client = Client(url, verbose=False)
    plot, words, concept_file, export_zip = client.predict(handle_file(demo.EXAMPLE), 2, 0, api_name="/personalise")
    # The losses the page draws are the ones tune_concept returns for the same photo, steps and seed.
    concept, stats = d.personalise(demo.EXAMPLE, 2, 0)
    assert [row[1] for row in plot["data"]] == pytest.approx(stats["losses"], rel=1e-9, abs=0)
    assert [row[0] for row in plot["data"]] == [1, 2]
    assert f"**{concept['nearest_words'][0][0]}**" in words and "2 tuning steps" in words
    # The concept file the page offers is a whole concept; the zip holds export.py's four files.
    assert model.load_concept(concept_file)["token_id"] == concept["token_id"]
    import zipfile

    assert len(zipfile.ZipFile(export_zip).namelist()) == 4

    gallery = client.predict("a photo of S* in the snow", 0.5, 7.5, 3, 0, 2, False, api_name="/generate")
    res = d.comps.cfg.resolution
    assert len(gallery) == 2
    for item in gallery:
        im = np.asarray(Image.open(item["image"]))
        assert im.shape[:2] == (res, res) and im.std() > 0
    assert gallery[0]["caption"].startswith("concept, alpha = 0.50")

    # compare: base model with the hard token, alpha = 1, alpha -- same seeds.
    gallery = client.predict("a photo of S*", 0.25, 7.5, 3, 0, 1, True, api_name="/generate")
    assert [g["caption"] for g in gallery] == [f"base model: 'a photo of {concept['token']}' (seed 0)",
                                               "concept, alpha = 1 (seed 0)", "concept, alpha = 0.25 (seed 0)"]


def test_http_api_bad_input_gives_the_scripts_one_line_and_the_server_keeps_serving(served, tmp_path):
    from gradio_client import Client, handle_file

    _, url = served
    client = Client(url, verbose=False)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(bad)), 2, 0, api_name="/personalise")
    assert "cannot read image" in str(e.value) and "broken.png" in str(e.value)  # data.load_image's line
    assert "Traceback" not in str(e.value)
    client.predict(handle_file(demo.EXAMPLE), 1, 0, api_name="/personalise")  # still serving
    for prompt, expect in (("a photo of a dog", "the prompt does not mention S*"),
                           (" ".join(["word"] * 80) + " S*", "the prompt is too long")):
        with pytest.raises(Exception) as e:
            client.predict(prompt, 0.5, 7.5, 3, 0, 1, False, api_name="/generate")
        assert expect in str(e.value), str(e.value)
    assert len(client.predict("S*", 0.5, 7.5, 2, 0, 1, False, api_name="/generate")) == 1  # still serving


def test_bad_command_line_and_missing_encoder_exit_2_with_one_line(capsys, tmp_path):
    assert demo.cli(["--preset", "tiny", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("demo.py: error: --port")
    assert demo.cli(["--preset", "toy", "--encoder", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo.py: error: no encoder checkpoint at")


def test_in_a_real_browser_upload_personalise_slide_alpha_generate(served, tmp_path):
    """Headless Chromium (Debian's package; Playwright's own download is not used), driven by
    Playwright: the page as a person sees it. The screenshot goes to tmp (and to
    DATE_DEMO_SCREENSHOT if set: docs/demo.png is made so)."""
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "the browser test needs Debian's chromium (apt-get install chromium; .ci/run does it)"
    _, url = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(PHOTO)
        page.get_by_role("button", name="Personalise").click()
        words = page.get_by_text("v* reads as:")
        expect(words).to_be_visible(timeout=120_000)
        expect(page.locator(".vega-embed, canvas, svg").first).to_be_visible()  # the loss plot
        page.get_by_label("prompt (with S*)").fill("a photo of a large S* on a blue background")
        page.get_by_label("alpha (Eq. 5)").first.fill("0.6")
        page.get_by_label("compare: base model with the hard token | alpha = 1 | alpha").check()
        page.get_by_role("button", name="Generate").click()
        gallery = page.locator("[data-testid='gallery'] img, .gallery img, .grid-container img")
        expect(gallery.first).to_be_visible(timeout=120_000)
        # compare on: 3 rows (base model with the hard token, alpha = 1, alpha = 0.6) of 4 images
        page.wait_for_function("() => [...document.querySelectorAll('img')].filter(i => i.naturalWidth > 0)"
                               ".length >= 12", timeout=120_000)
        assert page.locator(".toast-wrap .toast-body.error, .toast-body[type=error]").count() == 0
        assert "concept, alpha = 0.60" in page.content()
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("DATE_DEMO_SCREENSHOT"):
            shutil.copy(shot, os.environ["DATE_DEMO_SCREENSHOT"])
        browser.close()
    assert Image.open(shot).size[0] == 1280


def test_cancel_stops_tuning_and_sampling_within_a_step(served):
    d, _ = served
    seen = []

    def press_cancel(i, *_):  # Cancel pressed during the first step
        seen.append(i)
        d.stop.set()

    with pytest.raises(demo.Cancelled):
        d.personalise(PHOTO, 5, 0, on_step=press_cancel)
    assert seen == [0]  # the second step never ran
    concept, _ = d.personalise(PHOTO, 0, 0)  # a new job clears the flag
    seen.clear()
    with pytest.raises(demo.Cancelled):
        d.generate(concept, "a photo of S*", 0.5, 7.5, 10, 0, 1, on_step=press_cancel)
    assert seen == [0]
