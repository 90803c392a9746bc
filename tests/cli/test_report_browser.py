"""The HTML report in a real browser: headless Chromium renders it (DOM after rendering + screenshot)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; .ci/run installs it)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    url = tiny_run["html"].resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for sid in ("metrics", "store", "attribution", "spectrum", "intrinsic"):
        assert re.search(rf'<section id="{sid}"><h2>', html), sid
    assert html.count("<table>") >= 4  # metrics, store summary, checkpoint slices, attribution
    imgs = re.findall(r'<img alt="figure" src="data:image/png;base64,([A-Za-z0-9+/=]{200,})"', html)
    assert len(imgs) >= 2
    assert ">OK<" in html and "proponent" in html and "opponent" in html
    shot = tmp_path / "report.png"
    out = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", url)
    assert out.returncode == 0, out.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a rendered page, not a blank one
