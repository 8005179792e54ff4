"""The console in a real browser: Debian's chromium driven by Playwright (no browser
download: `executable_path`), and axe-core (vendored from npm, vendor/) checking each page.

scripts/test installs chromium when it is missing (scripts/browser); without it these
tests are skipped with the reason, not failed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = os.environ.get("HTTP2SMS_TEST_CHROMIUM", "/usr/bin/chromium")
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
# Screenshots of each page: the console's tour (a few are kept in docs/console/).
OUTPUT = Path(os.environ.get("HTTP2SMS_TEST_OUTPUT", "var/test-output")) / "console"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/browser (apt-get install "
                    "chromium) or set HTTP2SMS_TEST_CHROMIUM")
    async with async_playwright() as playwright:
        # --no-sandbox: the suite runs as root in CI, where chromium's sandbox refuses to start.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                    args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def accessibility_violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        # Evaluated by the browser's debugging protocol, which the page's CSP does not
        # govern: the pages are checked with their CSP on, as users get them.
        await page.evaluate(AXE.read_text(encoding="utf-8"))
    result = await page.evaluate(
        "async () => { const r = await axe.run(document, {resultTypes: ['violations']});"
        " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' '))})); }")
    return [v for v in result if v["impact"] in ("serious", "critical")]


def csp_violations(page: Page) -> list[str]:
    """The page's console errors about the Content-Security-Policy, as they come."""
    found: list[str] = []
    page.on("console", lambda message: found.append(message.text)
            if "Content Security Policy" in message.text else None)
    return found


async def screenshot(page: Page, name: str) -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
