"""The app in a real browser: headless Chromium loads the page, loads an example (which runs it),
and sees the overlays; the screenshot lands in test-artifacts/app.png for a human to look at.

Needs Debian's /usr/bin/chromium (tests/run.sh installs it); never downloads a browser.
"""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# tests/run.sh (and so CI) installs chromium and sets MULTIMODAL_REQUIRE_BROWSER=1: there a missing
# browser fails the test instead of skipping it. A bare `pytest` without chromium skips with this reason.
pytestmark = pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("MULTIMODAL_REQUIRE_BROWSER"),
                                reason="/usr/bin/chromium is absent (apt-get install -y chromium; tests/run.sh does it)")


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    import multimodal.app as A
    from multimodal import FusionConfig
    from multimodal.model import MultimodalModel
    from multimodal.data.scenes import generate_scene, save_scene

    examples = tmp_path_factory.mktemp("browser-examples")
    scene = generate_scene(3)
    save_scene(scene, examples, "scene")
    torch.manual_seed(0)
    cfg = FusionConfig(dim=64, heads=4, layers=2, query="text", query_self_attention=True)
    ckpt = MultimodalModel.from_specs(fusion=cfg, match="softmin").save_pretrained(tmp_path_factory.mktemp("ckpt"))
    models = tmp_path_factory.mktemp("models")  # a second checkpoint to switch to: 1 layer x 2 heads
    MultimodalModel.from_specs(fusion=FusionConfig(dim=32, heads=2, layers=1, query="text")).save_pretrained(
        models / "small")
    app = A.App(MultimodalModel.from_pretrained(ckpt), ckpt, examples_dir=examples, models_dir=models)
    demo = A.build_demo(app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(prevent_thread_lock=True, **A.launch_kwargs("127.0.0.1", port))
    yield f"http://127.0.0.1:{port}/", scene.caption
    demo.close()


def test_example_runs_in_the_browser_and_overlays_appear(page_url):
    from playwright.sync_api import expect, sync_playwright

    page_url, caption = page_url
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url, wait_until="domcontentloaded")
            expect(page.locator("#model-info")).to_contain_text("Model:", timeout=30_000)
            expect(page.locator("#model-info")).to_contain_text("no training record")

            page.get_by_text("scene", exact=True).first.click()  # the example: loads the inputs, then runs
            expect(page.locator("#status")).to_contain_text("Ran on", timeout=30_000)
            expect(page.locator("#in-text textarea")).to_have_value(caption)
            expect(page.locator("#score")).to_contain_text("match")

            def overlay_shown(elem: str) -> None:
                img = page.locator(f"{elem} img").first
                expect(img).to_be_visible(timeout=15_000)
                page.wait_for_function("(el) => el.complete && el.naturalWidth > 100", arg=img.element_handle())

            overlay_shown("#out-image")
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(ARTIFACTS / "app.png"))  # what a 1280x800 window shows first
            for tab, elem in (("Audio", "#out-audio"), ("Text", "#out-text")):
                page.get_by_role("tab", name=tab).click()
                overlay_shown(elem)
                page.screenshot(path=str(ARTIFACTS / f"app-{tab.lower()}.png"))
            expect(page.locator("#out-text-html")).to_contain_text("concentrated")
            page.get_by_role("tab", name="Metrics").click()
            expect(page.locator("#metrics")).to_contain_text("pointing image")
            page.screenshot(path=str(ARTIFACTS / "app-metrics.png"))

            page.get_by_role("tab", name="Encoders").click()  # the encoders' own heads, on the same inputs
            page.locator("#encoders-run").click()
            expect(page.locator("#encoders-note")).to_contain_text("rollout", timeout=30_000)
            overlay_shown("#out-encoders")
            expect(page.locator("#out-encoders")).to_contain_text("text layer0")
            page.screenshot(path=str(ARTIFACTS / "app-encoders.png"))

            page.get_by_role("tab", name="Relevance").click()  # gradient x attention beside the heads
            page.locator("#relevance-run").click()
            expect(page.locator("#relevance-note")).to_contain_text("grad x attn", timeout=30_000)
            overlay_shown("#out-relevance")
            expect(page.locator("#relevance-table")).to_contain_text("L0 grad x attn")
            page.screenshot(path=str(ARTIFACTS / "app-relevance.png"))

            page.get_by_role("tab", name="Studies").click()  # a committed study's report and plots
            page.locator("#study-choice input").click()
            page.get_by_role("option", name="size", exact=True).click()
            expect(page.locator("#study-report")).to_contain_text("Do larger fusion blocks", timeout=30_000)
            overlay_shown("#out-study-plots")
            page.screenshot(path=str(ARTIFACTS / "app-studies.png"))

            page.get_by_role("tab", name="Image").click()
            before = page.locator("#out-image img").first.get_attribute("src")
            page.locator("#layer").get_by_text("layer 1").click()  # redraw another layer, no model run
            expect(page.locator("#out-image img").first).not_to_have_attribute("src", before, timeout=15_000)
            assert "layer1_image" in page.locator("#out-image img").first.get_attribute("src")

            # switch model without a restart: the model line, the layers and the table follow
            page.locator("#model-choice input").click()
            page.get_by_role("option", name="small").click()
            expect(page.locator("#model-info")).to_contain_text("1 layer x 2 heads", timeout=30_000)
            expect(page.locator("#layer")).not_to_contain_text("layer 1")
            page.locator("#run").click()
            expect(page.locator("#status")).to_contain_text("Ran on", timeout=30_000)
            page.get_by_role("tab", name="Metrics").click()
            expect(page.locator("#metrics")).to_contain_text("L0 H1")
            expect(page.locator("#metrics")).not_to_contain_text("L0 H2")
            page.screenshot(path=str(ARTIFACTS / "app-model-switched.png"))
            assert not errors, errors
        finally:
            browser.close()
