"""A self-contained `index.html` gallery of a run: film, overlay and raw map side by side per heatmap, with the
question, answer, prompt and what the map explains (a target other than the prompt, a detector's detections), and
the evaluation's figures when `evaluate` has run (against boxes, and against the clinicians' attention). Images are
embedded as data URIs, so the file opens from disk without a server. Every text that comes from the data is
HTML-escaped."""
from __future__ import annotations

import base64
import json
import logging
from html import escape
from pathlib import Path

import cv2
import numpy as np

from . import outputs
from .images import ImageError, read_film
from .shards import read_run_config
from .timing import progress

log = logging.getLogger(__name__)

THUMBNAIL = 256   # longest side, pixels
PER_PAGE = 500    # heatmaps per page: some 20 MB of thumbnails (38 KB a heatmap), which a browser opens at once

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em; background: #f6f6f6; }
.bar { margin: .5em 0 1em; } .bar button { margin-right: .3em; }
.card { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: .6em; margin: .6em 0; }
.card.hit { border-left: 6px solid #2a9d3a; } .card.miss { border-left: 6px solid #c0392b; }
.images img { width: 256px; height: auto; margin-right: .4em; background: #000; }
.text { margin-top: .4em; white-space: pre-wrap; } .label { color: #666; }
.metrics { color: #333; font-size: .9em; margin-top: .3em; }
"""

_SCRIPT = """
function show(kind) {
  document.querySelectorAll('.card').forEach(function (card) {
    card.style.display = (kind === 'all' || card.classList.contains(kind)) ? '' : 'none';
  });
}
function sortBy(key) {
  var list = document.getElementById('cards');
  var cards = Array.prototype.slice.call(list.children);
  cards.sort(function (a, b) { return parseFloat(b.dataset[key] || -1) - parseFloat(a.dataset[key] || -1); });
  if (key === 'order') { cards.reverse(); }
  cards.forEach(function (card) { list.appendChild(card); });
}
"""


def _data_uri(image: np.ndarray | None) -> str:
    """A JPEG data URI of an RGB or grey uint8/uint16 image, shrunk to THUMBNAIL on its longest side (a sixth of
    the bytes of a PNG)."""
    if image is None:
        return ""
    scale = THUMBNAIL / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode() if ok else ""


def _read(path: Path, unread: list[Path]) -> np.ndarray | None:
    """The run's image at `path`, RGB; None, and `path` added to `unread`, where it is gone or damaged."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None   # OpenCV warns of a missing one
    if image is None:
        unread.append(path)
    if image is not None and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _film(image_root: Path | None, source_image: str, frame: str) -> np.ndarray | None:
    """The film a map was made of (the manifest's frame of a multi-frame DICOM), 8-bit; None if unreadable."""
    if image_root is None:
        return None
    try:
        film = read_film(image_root / source_image, frame=int(frame) if frame else "first")
        return np.round(film.pixels * 255).astype(np.uint8)
    except ImageError:
        return None


def _img(uri: str, alt: str) -> str:
    if not uri:
        return f'<span class="label">({escape(alt)} not available)</span>'
    return f'<img src="{uri}" alt="{escape(alt)}">'


def _card(output_dir: Path, image_root: Path | None, order: int, row: dict, score: dict | None,
          clinicians: dict | None, films: dict, unread: list[Path]) -> str:
    """The HTML of one heatmap: its images (the film's from `films`, made once per film; the run's own that cannot
    be read added to `unread`) and texts."""
    film = (row["source_image"], row.get("frame", ""))
    if film not in films:
        films[film] = _data_uri(_film(image_root, *film))
    mapped = score is not None and score.get("hit", "") != ""      # map metrics need the raw map
    kind = "" if not mapped else ("hit" if float(score["hit"]) else "miss")
    data = f' data-order="{order}"' + ("" if not mapped else f' data-energy="{escape(score["energy"])}" '
                                                             f'data-auroc="{escape(score["auroc"])}"')
    metrics = "" if not mapped else (
        f'pointing game: {kind}; energy in boxes {float(score["energy"]):.3f} '
        f'({float(score["energy_ratio"]):.2f}x uniform); IoU (Otsu) {float(score["iou_otsu"]):.3f}; '
        f'AUROC {float(score["auroc"]):.3f}')
    if score is not None and score.get("box_recall", "") != "":
        metrics += (f'{"; " if metrics else ""}boxes: {float(score["boxes_predicted"]):.0f}, recall at IoU 0.5 '
                    f'{float(score["box_recall"]):.2f}, best IoU {float(score["box_best_iou"]):.2f}')
    if clinicians is not None:
        metrics += (f'{"; " if metrics else ""}clinicians: CC {float(clinicians["cc"]):.2f}'
                    + "".join(f', {label} {float(clinicians[name]):.2f}' for name, label in
                              (("nss", "NSS"), ("auc_judd", "AUC-Judd")) if clinicians.get(name, "") != ""))
    metrics = f'<div class="metrics">{metrics}</div>' if metrics else ""
    boxes_image = outputs.boxes_image_name(row["image_path"])
    boxes = (_img(_data_uri(_read(output_dir / boxes_image, unread)), "boxes")
             if row.get("boxes") and (output_dir / boxes_image).is_file() else "")
    warning = f'<div class="text"><span class="label">warning:</span> {escape(row["warning"])}</div>' \
        if row.get("warning") else ""
    raw = _data_uri(_read(output_dir / row["raw_map"], unread)) if row.get("raw_map") else ""
    explained = ([f'{row["target"]} (score {row["score"]})'] if row.get("target", row["prompt"]) != row["prompt"]
                 else [])
    if row.get("detections"):   # a detector's, on the film
        explained.append("detections: " + (", ".join(f"{d[4]} {d[5]:.2f}" for d in json.loads(row["detections"]))
                                           or "none"))
    explained = (f'<div class="text"><span class="label">explains:</span> {escape("; ".join(explained))}</div>'
                 if explained else "")
    if row.get("model_answer") or row.get("p_yes"):    # a generative VLM's
        said = row.get("model_answer") or "(none)"
        said += f" (P(yes) {float(row['p_yes']):.2f})" if row.get("p_yes") else ""
        said += (f"; map's Spearman with the film's other questions {float(row['prompt_similarity']):.2f}"
                 if row.get("prompt_similarity") else "")
        explained += f'<div class="text"><span class="label">model answer:</span> {escape(said)}</div>'

    return (
        f'<div class="card {kind}"{data}>'
        f'<div class="images">{_img(films[film], "film")}'
        f'{_img(_data_uri(_read(output_dir / row["image_path"], unread)), "overlay")}{boxes}{_img(raw, "raw map")}'
        f'</div>'
        f'<div class="text"><span class="label">question:</span> {escape(row["question"])}</div>'
        f'<div class="text"><span class="label">answer:</span> {escape(row["answer"])}</div>'
        f'<div class="text"><span class="label">prompt:</span> {escape(row["prompt"])} '
        f'<span class="label">({escape(row["image_path"])})</span></div>{explained}{warning}{metrics}</div>')


def write_report(output_dir: Path, per_page: int = PER_PAGE) -> list[Path]:
    """Write OUTPUT_DIR/index.html for a finished run, and index-2.html, index-3.html, ... where it has more than
    `per_page` heatmaps (each page on its own, linked to the others); returns the pages' paths."""
    output_dir = Path(output_dir)
    rows = outputs.read_manifest(output_dir, "report on")
    scores = {}
    if (output_dir / "evaluation.csv").is_file():
        scores = {row["image_path"]: row for row in outputs.read_csv(output_dir / "evaluation.csv")}
    agreed = {}
    if (output_dir / "agreement.csv").is_file():
        agreed = {row["image_path"]: row for row in outputs.read_csv(output_dir / "agreement.csv")}
    root = read_run_config(output_dir).get("IMAGE_ROOT")
    image_root = Path(root) if root else None

    summary = ""
    if (output_dir / "evaluation.md").is_file() and any(s.get("hit") for s in scores.values()):
        hits = sum(1 for s in scores.values() if s.get("hit") and float(s["hit"]))
        summary = f"<p>Evaluation: {hits} of {len(scores)} heatmaps hit a box (see evaluation.md).</p>"
    if (output_dir / "robustness.json").is_file():
        robust = json.loads((output_dir / "robustness.json").read_text())
        figures = ", ".join(f"{name.replace('_', ' ')} {value['mean']:.2f} ({value['low']:.2f} to {value['high']:.2f})"
                            for name, value in robust["metrics"].items() if value["mean"] == value["mean"])
        summary += (f"<p>Paraphrase robustness over {robust['studies']} studies (95% CI, see robustness.md): "
                    f"{escape(figures)}.</p>")
    buttons = ('<button onclick="show(\'all\')">all</button><button onclick="show(\'hit\')">hits</button>'
               '<button onclick="show(\'miss\')">misses</button> sort: '
               '<button onclick="sortBy(\'order\')">input order</button>'
               '<button onclick="sortBy(\'energy\')">energy</button>'
               '<button onclick="sortBy(\'auroc\')">AUROC</button>') if scores else ""
    pages = max(1, -(-len(rows) // per_page))
    for stale in output_dir.glob("index-*.html"):      # of an earlier report with more pages
        if stale.stem[6:].isdigit() and int(stale.stem[6:]) > pages:
            stale.unlink()
    top = (f'<h1>{len(rows)} heatmaps on {len({(r["source_image"], r.get("frame", "")) for r in rows})} films</h1>'
           f'{summary}<div class="bar">{buttons}</div>')
    films, cards, unread, gone = {}, [], set(), []   # films: the thumbnails of this page's films, each made once
    for order in progress(range(len(rows)), "report"):
        row = rows[order]
        cards.append(_card(output_dir, image_root, order, row, scores.get(row["image_path"]),
                           agreed.get(row["image_path"]), films, gone))
        if len(cards) == per_page or order == len(rows) - 1:
            _write_page(output_dir, order // per_page + 1, pages, per_page, top, cards)
            unread.update(film for film, uri in films.items() if not uri)
            films, cards = {}, []
    if unread:
        log.warning("%d films could not be read under IMAGE_ROOT=%s (from %s), e.g. %s: their cards show the maps "
                    "without the film", len(unread), image_root, outputs.RUN_CONFIG, next(iter(unread))[0])
    if gone:
        log.warning("%d of the run's images are missing or damaged, e.g. %s: their cards say so; %s", len(gone),
                    gone[0], outputs.REMAKE)
    if not rows:
        _write_page(output_dir, 1, 1, per_page, top, [])
    return [output_dir / _page_name(number) for number in range(1, pages + 1)]


def _page_name(number: int) -> str:
    return "index.html" if number == 1 else f"index-{number}.html"


def _write_page(output_dir: Path, number: int, pages: int, per_page: int, top: str, cards: list[str]) -> None:
    links = "" if pages == 1 else '<p class="pages">page ' + " ".join(
        f"<b>{n}</b>" if n == number else f'<a href="{_page_name(n)}">{n}</a>' for n in range(1, pages + 1)) + \
        f" of {pages} ({per_page} heatmaps each; the buttons act on this page)</p>"
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>attention-map: {escape(output_dir.name)}'
            f'{"" if pages == 1 else f" ({number} of {pages})"}</title><style>{_STYLE}</style><script>{_SCRIPT}'
            f'</script></head><body>{top}{links}<div id="cards">{"".join(cards)}</div>{links}</body></html>\n')
    outputs.write_atomic(output_dir / _page_name(number), page.encode("utf-8"))
