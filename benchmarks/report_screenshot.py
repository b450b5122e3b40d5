"""Open a ``report.html`` in headless Chromium: a screenshot to look at, and the page's render self-check.

    python -m benchmarks.report_screenshot runs/demo/report/report.html --out runs/demo/report/screenshot.png

Needs Debian's ``chromium`` (``apt-get install chromium``). Prints the self-check the page computes
on load (images loaded, none broken, nothing wider than the window) and exits 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render_check(page: Path, width: int = 1366, height: int = 900, timeout: float = 120) -> dict:
    """The page's ``data-render-check`` after load: ``{"images": n, "broken": k, "overflow": bool}``."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on this machine (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    found = re.search(r'data-render-check="([^"]*)"', done.stdout)
    if found is None:
        raise RuntimeError(f"the page did not report its render check (chromium said: {done.stderr[-500:]})")
    return json.loads(found.group(1).replace("&quot;", '"'))


def screenshot(page: Path, out: Path, width: int = 1366, height: int = 2400, timeout: float = 120) -> Path:
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on this machine (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out.resolve()}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="screenshot PNG (default: next to the page)")
    parser.add_argument("--width", type=int, default=1366)
    args = parser.parse_args()
    check = render_check(args.page, args.width)
    shot = screenshot(args.page, args.out or args.page.with_name("screenshot.png"), args.width)
    print(f"render check: {check}\nscreenshot: {shot}")
    sys.exit(0 if check["images"] > 0 and not check["broken"] and not check["overflow"] else 1)
