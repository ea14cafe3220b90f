"""Each demo in a real browser: Playwright drives Debian's chromium (never a downloaded browser) to type a prompt,
click, wait for a generated image and save a screenshot: docs/images/demo-NAME.png when
MMALIGN_WRITE_SCREENSHOTS=1, else the test's tmp folder."""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

from demo_server import served  # noqa: E402

from mmalign.demos.compare_demo import build_compare_demo  # noqa: E402
from mmalign.demos.reno_demo import DEFAULT_REWARD, build_reno_demo  # noqa: E402
from mmalign.demos.rewards_demo import build_rewards_demo  # noqa: E402
from mmalign.demos.scoring import load_sampler  # noqa: E402
from mmalign.rewards import build  # noqa: E402

CHROMIUM = shutil.which("chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
PROMPT = "a green box to the right of a purple triangle"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian: apt-get install chromium; "
                                                          ".ci/run installs it)")


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


def _screenshot_path(name: str, tmp_path: Path) -> Path:
    folder = DOCS_IMAGES if os.environ.get("MMALIGN_WRITE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"demo-{name}.png"


def _drive(browser, url: str, button: str, wait_for: str, shot: Path, prompt: str = PROMPT) -> None:
    """Open ``url``, type ``prompt``, click ``button``, wait until ``wait_for`` (a CSS selector) shows, save
    a full-page screenshot."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("prompt").fill(prompt)
        page.get_by_role("button", name=button, exact=True).click()
        page.locator(wait_for).first.wait_for(state="visible", timeout=90_000)
        page.wait_for_timeout(500)  # let the other outputs of the same event render
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    assert shot.stat().st_size > 10_000


def test_rewards_demo_in_a_browser(browser, world_sampler, demo_rewards, tmp_path):
    shot = _screenshot_path("rewards", tmp_path)
    with served(build_rewards_demo(world_sampler, demo_rewards)) as url:
        _drive(browser, url, "Generate", "div.gallery-container img, button.thumbnail-item img, .grid-wrap img", shot)


def test_reno_demo_in_a_browser(browser, tmp_path):
    sampler = load_sampler("world", guidance_scale=5.0)
    shot = _screenshot_path("reno", tmp_path)
    with served(build_reno_demo(sampler, build(DEFAULT_REWARD), max_iterations=8, num_steps=4)) as url:
        _drive(browser, url, "Run ReNO", "text=/^done: best iterate/", shot)


def test_compare_demo_in_a_browser(browser, tiny_run, tmp_path):
    shot = _screenshot_path("compare-overcooked", tmp_path)
    with served(build_compare_demo([tiny_run])) as url:
        _drive(browser, url, "Compare", ".grid-wrap img", shot)
