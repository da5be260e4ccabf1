"""Body masks on real films: the lungs kept (the 61 films with lung segmentations, and hard cases derived from NIH
films whose lungs were outlined by hand), the background and burned-in letters dropped."""
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from attention_map.body_mask import BODY_MASKS, air_mask, body_mask, content_box, otsu_mask
from attention_map.images import load_film
from attention_map.postprocess import apply_mask
from attention_map.render import colormap_lut, overlay

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_body_mask import (HARD_CASES, HAS_BACKGROUND, hard_case, lung_films, outlined_lungs,  # noqa: E402
                             reference_background)
from cxr_truth import LETTERS, LUNG_OUTLINES  # noqa: E402


def _kept(mask, lung) -> float:
    return float((mask & lung).sum() / lung.sum())


@pytest.mark.parametrize("name", sorted(LUNG_OUTLINES))
def test_air_mask_keeps_the_lungs_of_every_hard_case(cxr, name):
    film = load_film(cxr / "nih" / name)
    lungs = outlined_lungs(name, film.shape)
    kept = {case: _kept(air_mask(hard), lung) for case in HARD_CASES for hard, lung in [hard_case(film, lungs, case)]}
    assert min(kept.values()) >= 0.99, kept


def test_the_hard_cases_are_hard_for_the_otsu_mask(cxr):
    """Otherwise the test above would prove nothing: the earlier mask cuts the dark lung that reaches the edge."""
    name = "00000129_000.png"
    film = load_film(cxr / "nih" / name)
    hard, lung = hard_case(film, outlined_lungs(name, film.shape), "dark lung at the edge")
    assert _kept(otsu_mask(hard), lung) < 0.9 <= _kept(air_mask(hard), lung)


@pytest.mark.parametrize("name", sorted(LUNG_OUTLINES))
def test_padding_is_never_body_and_the_air_inside_it_is_dropped(cxr, name):
    film = load_film(cxr / "nih" / name)
    lungs = outlined_lungs(name, film.shape)
    plain = air_mask(film)
    for case in ("black border", "white border"):
        padded, _ = hard_case(film, lungs, case)
        pad = film.shape[0] // 6
        mask = air_mask(padded)
        assert not mask[:pad].any() and not mask[-pad:].any() and not mask[:, :pad].any() and not mask[:, -pad:].any()
        inside = mask[pad:-pad, pad:-pad]
        assert (inside == plain).mean() > 0.97, case   # the film inside the border is masked as without one


def test_air_mask_meets_its_goals_on_the_films_with_lung_masks(cxr):
    """The issue's goals on the 61 case-report and portable films: lungs kept >= 0.99 on 98% of the films and never
    under 0.95; the background >= 90% dropped on every film that has background (definitions: the benchmark)."""
    if not (cxr / "lungmasks" / "images").is_dir():
        pytest.skip(f"the films with lung masks are not at {cxr / 'lungmasks'}")
    kept, dropped = {}, {}
    for name, film, lung in lung_films(cxr / "lungmasks", None):
        mask = air_mask(film)
        kept[name] = _kept(mask, lung) if lung.any() else 1.0
        background = reference_background(film, lung)
        if background.mean() >= HAS_BACKGROUND:
            dropped[name] = float((background & ~mask).sum() / background.sum())
    assert len(kept) == 61
    under = {name: value for name, value in kept.items() if value < 0.99}
    assert len(under) <= 0.02 * len(kept) and min(kept.values()) >= 0.95, under
    assert len(dropped) > 30 and min(dropped.values()) >= 0.9, {n: v for n, v in dropped.items() if v < 0.9}


@pytest.mark.parametrize("method", sorted(BODY_MASKS))
def test_body_mask_keeps_the_chest_on_every_nih_film(cxr, method):
    for path in sorted((cxr / "nih").glob("*.png")):
        film = load_film(path)
        mask = body_mask(film, method)
        h, w = film.shape
        assert mask.shape == film.shape and mask.dtype == bool
        centre = mask[int(0.3 * h):int(0.7 * h), int(0.2 * w):int(0.8 * w)].mean()
        assert centre > 0.95, f"{path.name}: only {centre:.2f} of the chest is inside the body mask"
        assert mask.mean() < 0.995, f"{path.name}: the mask covers the whole film"


@pytest.mark.parametrize("method", sorted(BODY_MASKS))
@pytest.mark.parametrize("name, y0, y1, x0, x1", LETTERS)
def test_corner_letters_are_cold_in_the_overlay(cxr, method, name, y0, y1, x0, x1):
    film = load_film(cxr / "nih" / name)
    heat, warning = apply_mask(np.ones_like(film), body_mask(film, method))
    assert warning == ""
    letter = film[y0:y1, x0:x1] > 0.85
    assert letter.sum() > 20
    assert (heat[y0:y1, x0:x1][letter] == 0).mean() > 0.9
    rgb = overlay(film, heat, "jet", 1.0)
    cold = colormap_lut("jet")[0]
    assert (rgb[y0:y1, x0:x1][letter] == cold).all(axis=-1).mean() > 0.9


@pytest.mark.parametrize("method", sorted(BODY_MASKS))
def test_masks_of_degenerate_films(method):
    flat = np.full((40, 60), 0.3, np.float32)
    assert body_mask(flat, method).all()          # nothing to tell the body by: the map is left whole
    small = np.zeros((3, 3), np.float32)
    small[1, 1] = 1
    assert body_mask(small, method).shape == (3, 3)


def test_air_mask_of_a_synthetic_body_on_air():
    """A bright body with two dark lungs on noisy black air: the air goes, the lungs stay, the padding goes."""
    rng = np.random.default_rng(0)
    film = rng.normal(0.05, 0.01, (300, 400)).astype(np.float32)
    cv2.ellipse(film, (200, 160), (140, 130), 0, 0, 360, 0.7, -1)
    lungs = np.zeros(film.shape, np.uint8)
    for cx in (150, 250):
        cv2.ellipse(lungs, (cx, 150), (35, 80), 0, 0, 360, 1, -1)
    film[lungs > 0] = 0.3 + rng.normal(0, 0.02, int(lungs.sum())).astype(np.float32)
    film = np.pad(np.clip(film, 0, 1), ((20, 0), (0, 0)), constant_values=1.0)   # a white strip on top
    lungs = np.pad(lungs, ((20, 0), (0, 0))).astype(bool)
    mask = air_mask(film)
    assert content_box(film) == (20, 320, 0, 400)
    assert mask[lungs].all() and not mask[:20].any()
    assert not mask[25:60, :40].any() and not mask[-40:, -40:].any()   # the air in the corners
