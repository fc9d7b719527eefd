"""The report in a real browser: headless Chromium (Debian's `chromium`, driven by playwright) loads
report.html with no network request, no console error, and every figure decoded and visible.

CI installs the browser (`apt-get install -y chromium`, see .ci/run) and sets ATTNPROBE_REQUIRE_BROWSER=1,
so there a missing browser fails the test; elsewhere it is skipped with the command that installs it."""
import os
import shutil

import pandas as pd
import pytest
from fixtures_runs import write_synthetic_run

from attnprobe.analyses.presentation.report import FIGURES, write_report

CHROMIUM = os.environ.get("ATTNPROBE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip():
    required = os.environ.get("ATTNPROBE_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("playwright is not installed: pip install -e '.[test]'")
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    if CHROMIUM is None:
        if required:
            pytest.fail("no chromium found: apt-get install -y chromium")
        pytest.skip("no chromium found: apt-get install -y chromium (or set ATTNPROBE_CHROMIUM)")
    return sync_playwright


def load_in_chromium(page_path):
    """(urls requested outside the file, console errors, one dict per <img>) of the page in headless Chromium."""
    sync_playwright = _browser_or_skip()
    outside, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()

        def route(request_route):
            url = request_route.request.url
            if url.startswith(("file:", "data:")):
                request_route.continue_()
            else:  # anything else would be a network request: record it and never let it out
                outside.append(url)
                request_route.abort()

        page.route("**/*", route)
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.eval_on_selector_all("img", """images => images.map(image => {
            const box = image.getBoundingClientRect();
            return {alt: image.alt, complete: image.complete, natural: [image.naturalWidth, image.naturalHeight],
                    shown: [box.width, box.height], hidden: getComputedStyle(image).visibility === 'hidden'
                            || getComputedStyle(image).display === 'none'};
        })""")
        browser.close()
    return outside, errors, images


def test_report_loads_offline_without_errors_and_every_figure_is_visible(tmp_path):
    _browser_or_skip()
    run = write_synthetic_run(tmp_path / "run")
    heads = pd.read_parquet(run / "heads.parquet")  # a mathtext-looking token in a label and a table cell
    heads.loc[0, "hidden_sink_tokens"] = "'$$' '$x^2$'"
    heads.to_parquet(run / "heads.parquet")
    outside, errors, images = load_in_chromium(write_report(run, formats=("png",)))
    assert outside == []
    assert errors == []
    assert sorted(image["alt"] for image in images) == sorted(spec.name for spec in FIGURES)
    for image in images:
        assert image["complete"] and min(image["natural"]) > 0, image
        assert min(image["shown"]) > 0 and not image["hidden"], image
