"""The report: a self-contained gallery that a real browser renders, with the data's text shown, never run."""
import json
import os
import shutil
import subprocess

import cv2
import pytest

from attention_map.synthetic import write_demo_data

from test_cli import cli

HOSTILE_QUESTION = ("Is it <script>document.body.setAttribute('data-pwned', 'script')</script> "
                    "<img src=x onerror=\"document.body.setAttribute('data-pwned', 'img')\">?")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/install_system_tools.sh installs it)")
        pytest.skip("chromium is not installed (scripts/install_system_tools.sh installs it)")
    return found


def _browse(page, tmp_path, *mode):
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
                           *mode, page.as_uri()], capture_output=True, text=True, timeout=120)


def test_report_renders_the_images_and_shows_hostile_text_as_text(tmp_path, tiny_model, capfd):
    records = write_demo_data(tmp_path / "data", count=2, size=192)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    lines[0]["question"] = HOSTILE_QUESTION
    lines[0]["answer"] = "</div><b>bold?</b>"
    for line in lines:
        line["visual_regions"] = [line["visual_regions"][0], "heart"]
        line["visual_locations"] = [[120, 40, 200, 140], [90, 100, 150, 160]]
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    # run from the data's folder with relative paths, the report from another: it still finds the films
    assert cli("run", "DATA_FILE=data/records.jsonl", f"MODEL={tiny_model}", "OUTPUT_DIR=out", "PROMPT_SOURCE=both",
               "SAVE_RAW_CAM=true", cwd=tmp_path).returncode == 0
    assert cli("evaluate", out, "--truth", records).returncode == 0
    result = cli("report", out)
    assert result.returncode == 0, result.stderr
    page = out / "index.html"
    html = page.read_text()
    assert "&lt;script&gt;" in html and "<script>document.body" not in html and "&lt;/div&gt;&lt;b&gt;" in html
    assert html.count("data:image/jpeg;base64,") == 6 * 3     # film, overlay, raw map for 6 heatmaps
    assert ('class="card hit"' in html or 'class="card miss"' in html) and "film not available" not in html

    dom = _browse(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-1000:]
    assert "data-pwned" not in dom.stdout.split("<body")[1].split(">")[0]     # neither payload ran
    assert "&lt;script&gt;document.body.setAttribute" in dom.stdout          # it is shown as text
    shot = tmp_path / "shot.png"
    assert _browse(page, tmp_path, f"--screenshot={shot}").returncode == 0
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (900, 1200)
    spread = image.max(axis=2).astype(int) - image.min(axis=2)
    assert (spread > 120).mean() > 0.02          # colour-mapped overlays rendered (jet is saturated)
    grey = (spread < 10) & (image.mean(axis=2) > 30) & (image.mean(axis=2) < 220)
    assert grey.mean() > 0.02                    # and the films (grey, neither page white nor black)

    # a large run's gallery comes in pages that a browser opens, each on its own and linked to the others
    paged = cli("report", out, "--per-page", "4")
    assert paged.returncode == 0 and f"wrote {page}, index-2.html" in paged.stderr
    second = (out / "index-2.html").read_text()
    assert page.read_text().count('class="card') == 4 and second.count('class="card') == 2
    assert '<a href="index.html">1</a> <b>2</b> of 2' in second and '<a href="index-2.html">2</a>' in page.read_text()
    assert second.count("data:image/jpeg;base64,") == 2 * 3 and "<h1>6 heatmaps on 2 films</h1>" in second
    assert cli("report", out).returncode == 0 and not (out / "index-2.html").exists()   # one page again: no stale
    config = out / "run_config.conf"
    config.write_text(config.read_text().replace(str(tmp_path / "data"), str(tmp_path / "moved")))
    moved = cli("report", out)
    assert moved.returncode == 0 and f"2 films could not be read under IMAGE_ROOT={tmp_path / 'moved'}" in moved.stderr
    assert out.joinpath("index.html").read_text().count("(film not available)") == 6

    # an overlay gone and a raw map cut short after the run: one warning names one and says how to remake them
    first = sorted((out / "films").glob("*_idx0.png"))[0]
    first.unlink()
    raw = next((out / "films").glob("*_cam.png"))
    raw.write_bytes(raw.read_bytes()[:300])
    capfd.readouterr()
    damaged = cli("report", out)
    assert damaged.returncode == 0 and "WARN" not in capfd.readouterr().err      # nor OpenCV's own line on stderr
    assert (f"2 of the run's images are missing or damaged, e.g. {first}: their cards say so; the same "
            f"`attention-map run` again (RESUME=true) remakes" in damaged.stderr), damaged.stderr
    html = out.joinpath("index.html").read_text()
    assert html.count("(overlay not available)") == 1 and html.count("(raw map not available)") == 1
