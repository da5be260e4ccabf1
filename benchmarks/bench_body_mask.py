"""How well each body mask keeps the lungs, drops the background and drops burned-in letters, and what it costs.

    .venv/bin/python benchmarks/bench_body_mask.py [--limit N] [--repeats 5]

On the 61 real radiographs with lung segmentations in ../shared/data/cxr/lungmasks/ (case-report figures and
portable films; the masks are a model's output, approximate) it prints, per mask method:
  * lung kept: the share of each film's lung pixels inside the mask (median, 5th percentile, minimum, films under
    0.99, and their names). Lung-mask pixels on constant padding (rows or columns at the film's edge of one grey
    value, and the pixels of that grey joined to them: the wedge of a rotated scan) are not counted: no anatomy lies
    there, and the segmentation model spills into it on one film.
  * background dropped: the share of each film's reference background outside the mask, on the films that have
    background. The reference is independent of every mask method: pixels joined to the film's border through
    pixels darker than 99% of that film's lung pixels (air the X-rays reached unattenuated), kept only where they
    lie at least 2% of the film's longer side from anything else (the air around the patient, not the band where it
    shades into skin, which a mask keeps as a margin on purpose).
  * hard cases: the lung kept on films derived from two NIH films whose lungs were outlined by hand
    (tests/cxr_truth.py LUNG_OUTLINES; `hard_case` below): the lowest and the case it was on.
  * letters dropped: on the NIH films in ../shared/data/cxr/nih/, the share of the pixels of each burned-in letter
    located by hand (tests/cxr_truth.py LETTERS) outside the mask.
  * milliseconds per film at 1024 x 1024 (the NIH films), median of --repeats passes, and the ratio to the first
    method (otsu, the earlier mask), from the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))   # the letters located by hand are the tests' truth
from attention_map.images import load_film  # noqa: E402
from attention_map.body_mask import BODY_MASKS, content_box  # noqa: E402
from cxr_truth import LETTERS, LUNG_OUTLINES  # noqa: E402

CXR = REPO.parent / "shared" / "data" / "cxr"
METHODS = {"otsu": BODY_MASKS["otsu"], "air": BODY_MASKS["air"]}   # the first is the yardstick of time
AWAY_FROM_BODY = 0.02     # of the longer side
HAS_BACKGROUND = 0.01     # films whose reference background is at least this share of the film


def padding(film: np.ndarray) -> np.ndarray:
    """Rows and columns at the film's edge that hold a single grey value, and the pixels of that grey joined to them
    (the wedge a rotated scan leaves)."""
    y0, y1, x0, x1 = content_box(film)
    out = np.ones(film.shape, bool)
    out[y0:y1, x0:x1] = False
    if not out.any() or out.all():
        return out
    same = np.zeros(film.shape, bool)
    for grey in np.unique(film[out]):
        same |= np.abs(film - grey) < 1 / 255
    labels, _ = ndimage.label(same)
    return out | np.isin(labels, np.unique(labels[out & same]))


def reference_background(film: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """See the module's docstring: dark air joined to the border, away from the body."""
    dark = film < np.percentile(film[lung], 1)
    labels, _ = ndimage.label(dark)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0]) & ~lung
    radius = max(1, round(AWAY_FROM_BODY * max(film.shape)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    padded = np.pad(background.astype(np.uint8), radius, constant_values=1)   # the film's edge is not body
    return cv2.erode(padded, disk)[radius:-radius, radius:-radius].astype(bool)


HARD_CASES = ("cropped to the lungs", "dark lung at the edge", "black border", "white border",
              "figure with a label and an arrow")


def outlined_lungs(name: str, shape) -> list[np.ndarray]:
    """The lungs outlined by hand on an NIH film (tests/cxr_truth.py), as masks at the film's size: [right, left]."""
    lungs = []
    for outline in LUNG_OUTLINES[name]:
        lung = np.zeros(shape, np.uint8)
        cv2.fillPoly(lung, [np.round(np.array(outline) * shape[1] / 512).astype(np.int32)], 1)
        lungs.append(lung.astype(bool))
    return lungs


def _box(mask):
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, columns[0], columns[-1] + 1


def hard_case(film: np.ndarray, lungs: list[np.ndarray], case: str) -> tuple[np.ndarray, np.ndarray]:
    """A film that is hard for a body mask, derived from `film`, and where its lungs are."""
    right, lung = lungs[0], lungs[0] | lungs[1]
    if case == "cropped to the lungs":        # the lungs touch all four edges
        y0, y1, x0, x1 = _box(lung)
        return film[y0:y1, x0:x1], lung[y0:y1, x0:x1]
    if case == "dark lung at the edge":       # hyperlucent: 70% of the way to the air's grey, cut open by the edge
        air = np.percentile(film, 1)
        weight = cv2.GaussianBlur(right.astype(np.float32), (0, 0), 4)
        dark = film - weight * 0.7 * (film - air)
        _, _, x0, x1 = _box(right)
        cut = x0 + (x1 - x0) // 3
        return dark[:, cut:], lung[:, cut:]
    if case in ("black border", "white border"):
        pad = film.shape[0] // 6
        return np.pad(film, pad, constant_values=0.0 if case == "black border" else 1.0), np.pad(lung, pad)
    if case == "figure with a label and an arrow":   # white text and an arrow drawn on the body, a corner caption
        height, width = film.shape
        y0, y1, x0, x1 = _box(right)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        ink = np.zeros(film.shape, np.uint8)
        cv2.arrowedLine(ink, (cx - width // 8, cy - height // 8), (cx, cy), 255, max(2, width // 150), tipLength=0.3)
        cv2.putText(ink, "cavity", (cx - width // 6, cy - height // 7), cv2.FONT_HERSHEY_SIMPLEX, width / 600, 255,
                    max(2, width // 300))
        cv2.putText(ink, "Fig. 2", (width // 20, height // 12), cv2.FONT_HERSHEY_SIMPLEX, width / 500, 255,
                    max(2, width // 250))
        return np.maximum(film, ink / np.float32(255)), lung
    raise ValueError(case)


def lung_films(folder: Path, limit: int | None):
    for image in sorted((folder / "images").iterdir())[:limit]:
        film = load_film(image)
        lung = cv2.imread(str(folder / "masks" / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 127
        yield image.name, film, lung & ~padding(film)


def _spread(values: list[float]) -> str:
    values = np.array(values)
    return (f"median {np.median(values):.4f}, 5th percentile {np.percentile(values, 5):.4f}, "
            f"min {values.min():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cxr", type=Path, default=CXR, help="the shared chest X-ray folder (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N films with lung masks")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not (args.cxr / "lungmasks" / "images").is_dir():
        sys.exit(f"the films with lung masks are not at {args.cxr / 'lungmasks'}")
    films = list(lung_films(args.cxr / "lungmasks", args.limit))
    backgrounds = [reference_background(film, lung) for _, film, lung in films]
    nih = {name: load_film(args.cxr / "nih" / name) for name in sorted({letter[0] for letter in LETTERS})}
    timed = [load_film(path) for path in sorted((args.cxr / "nih").glob("*.png"))]
    hard = []
    for name in sorted(LUNG_OUTLINES):
        film = load_film(args.cxr / "nih" / name)
        lungs = outlined_lungs(name, film.shape)
        hard += [(f"{name} {case}", *hard_case(film, lungs, case)) for case in HARD_CASES]
    with_background = sum(b.mean() >= HAS_BACKGROUND for b in backgrounds)
    print(f"{len(films)} films with lung masks ({with_background} with background), {len(LETTERS)} letters on "
          f"{len(nih)} NIH films, {len(timed)} NIH films timed x {args.repeats}")
    first_time = None
    for method, make_mask in METHODS.items():
        kept, dropped, under = [], [], []
        for (name, film, lung), background in zip(films, backgrounds):
            mask = make_mask(film)
            kept.append(float((mask & lung).sum() / max(1, lung.sum())))
            if kept[-1] < 0.99:
                under.append(f"{name} {kept[-1]:.3f}")
            if background.mean() >= HAS_BACKGROUND:
                dropped.append(float((background & ~mask).sum() / background.sum()))
        hard_kept = [((make_mask(film) & lung).sum() / lung.sum(), case) for case, film, lung in hard]
        letters = []
        for name, y0, y1, x0, x1 in LETTERS:
            film = nih[name]
            letter = film[y0:y1, x0:x1] > 0.85
            letters.append(float((~make_mask(film)[y0:y1, x0:x1][letter]).mean()))
        passes = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for film in timed:
                make_mask(film)
            passes.append((time.perf_counter() - started) / len(timed))
        milliseconds = statistics.median(passes) * 1e3
        first_time = first_time or milliseconds
        print(f"\n{method}")
        print(f"  lung kept: {_spread(kept)}; {len(under)} of {len(kept)} films under 0.99"
              + (f" ({'; '.join(under)})" if under else ""))
        if dropped:
            print(f"  background dropped: {_spread(dropped)}; {sum(d < 0.9 for d in dropped)} of {len(dropped)} "
                  f"films under 0.9")
        worst = min(hard_kept)
        print(f"  hard cases: lung kept at least {worst[0]:.4f} ({worst[1]}); {sum(k < 0.99 for k, _ in hard_kept)} of "
              f"{len(hard_kept)} under 0.99")
        print(f"  letters dropped: min {min(letters):.3f}, mean {np.mean(letters):.3f} over {len(letters)} letters")
        print(f"  {milliseconds:.1f} ms per film at 1024 x 1024 ({milliseconds / first_time:.2f}x {next(iter(METHODS))})")


if __name__ == "__main__":
    main()
