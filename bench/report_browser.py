"""Open a pipeline's HTML report in headless Chromium: it renders, with every image, and
references nothing outside itself; save a screenshot for the README.

    python -m bench.report_browser                       # runs examples/digits.yaml first if needed
    python -m bench.report_browser runs/x/steps/06-report/report.html --screenshot docs/report.png

Needs Chromium from the OS packages (``apt-get install -y chromium``); not part of the
test suite, since CI has no browser.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

_PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-rendered', "
          "[...document.images].map(i => i.complete ? i.naturalWidth + 'x' + i.naturalHeight : 'broken')"
          ".join(',')));</script>")


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, name, value))


def static_checks(page: str) -> list[str]:
    """Problems found without a browser: references to anything but data: URLs, images
    that do not decode."""
    import matplotlib.image as mpimg

    parser = _Refs()
    parser.feed(page)
    problems = []
    for tag, name, value in parser.refs:
        if value.startswith("#"):
            continue
        if not value.startswith("data:"):
            problems.append(f"<{tag} {name}={value[:80]!r}> is not embedded")
            continue
        if value.startswith("data:image/png;base64,"):
            try:
                img = mpimg.imread(io.BytesIO(base64.b64decode(value.split(",", 1)[1])), format="png")
            except Exception as exc:  # noqa: BLE001 - any decode failure is the finding
                problems.append(f"<{tag}> PNG does not decode: {exc}")
                continue
            if min(img.shape[:2]) < 10:
                problems.append(f"<{tag}> PNG is {img.shape}")
    if not parser.refs:
        problems.append("no images at all")
    return problems


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    sys.exit("no Chromium found: apt-get install -y chromium")


def browser_checks(html_path: Path, screenshot: Path, width: int, height: int) -> tuple[list[str], str]:
    """Render in headless Chromium: every <img> loaded with a size; a screenshot written."""
    exe = _chromium()
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
             "--virtual-time-budget=5000", "--allow-file-access-from-files"]
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe.html"
        probe.write_text(html_path.read_text().replace("</body>", _PROBE + "</body>"))
        dom = subprocess.run([exe, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                             timeout=120, check=False)
    problems = []
    m = re.search(r'data-rendered="([^"]*)"', dom.stdout)
    if not m:
        problems.append(f"the page did not finish loading (chromium exit {dom.returncode}: {dom.stderr[-300:]})")
        rendered = ""
    else:
        rendered = m.group(1)
        sizes = rendered.split(",") if rendered else []
        bad = [s for s in sizes if s == "broken" or s.startswith("0x")]
        if not sizes or bad:
            problems.append(f"images not rendered: {rendered or 'none'}")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = subprocess.run([exe, *flags, f"--window-size={width},{height}", f"--screenshot={screenshot.resolve()}",
                           html_path.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=False)
    if not screenshot.is_file():
        problems.append(f"no screenshot (chromium exit {shot.returncode}: {shot.stderr[-300:]})")
    else:
        import matplotlib.image as mpimg

        img = mpimg.imread(str(screenshot))
        if float(img.std()) < 0.01:
            problems.append("the screenshot is blank")
    return problems, rendered


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report_browser", description=__doc__.splitlines()[0])
    p.add_argument("report", nargs="?", default="runs/digits/steps/06-report/report.html",
                   help="report.html (default: the digits example's; run first when missing)")
    p.add_argument("--screenshot", default="docs/report.png", help="where to save the screenshot PNG")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=1500)
    args = p.parse_args(argv)
    report = Path(args.report)
    if not report.is_file():
        from fxslim import cli

        print(f"{report} missing: running examples/digits.yaml", file=sys.stderr)
        if cli.main(["run", "examples/digits.yaml", "--quiet"]) != 0:
            return 1
    page = report.read_text()
    problems = static_checks(page)
    more, rendered = browser_checks(report, Path(args.screenshot), args.width, args.height)
    problems += more
    print(f"{report}: {len(page) / 1e3:.0f} kB, images rendered in Chromium: {rendered or 'none'}")
    print(f"screenshot: {args.screenshot}")
    for line in problems:
        print(f"PROBLEM: {line}")
    print("OK: renders with its images, no external or broken references" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
