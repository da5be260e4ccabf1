import numpy as np
import pytest

from attention_map.images import load_film
from attention_map.postprocess import CRFParams, apply_mask, body_mask, crf_refine
from attention_map.render import colormap_lut, overlay

# Burned-in side letters lying on background, found by eye on the NIH films: (file, y0, y1, x0, x1) in pixels.
LETTERS = [("00000820_000.png", 4, 27, 949, 974), ("00000820_000.png", 52, 96, 947, 973),
           ("00026911_000.png", 57, 98, 894, 917), ("00022084_000.png", 54, 82, 950, 972),
           ("00002578_000.png", 113, 147, 964, 993), ("00007217_000.png", 70, 97, 970, 1010),
           ("00000550_000.png", 41, 77, 909, 932)]


def test_body_mask_keeps_the_chest_on_every_nih_film(cxr):
    for path in sorted((cxr / "nih").glob("*.png")):
        film = load_film(path)
        mask = body_mask(film)
        h, w = film.shape
        assert mask.shape == film.shape and mask.dtype == bool
        centre = mask[int(0.3 * h):int(0.7 * h), int(0.2 * w):int(0.8 * w)].mean()
        assert centre > 0.95, f"{path.name}: only {centre:.2f} of the chest is inside the body mask"
        assert mask.mean() < 0.995, f"{path.name}: the mask covers the whole film"


@pytest.mark.parametrize("name, y0, y1, x0, x1", LETTERS)
def test_corner_letters_are_cold_in_the_overlay(cxr, name, y0, y1, x0, x1):
    film = load_film(cxr / "nih" / name)
    heat, warning = apply_mask(np.ones_like(film), body_mask(film))
    assert warning == ""
    letter = film[y0:y1, x0:x1] > 0.85
    assert letter.sum() > 20
    assert (heat[y0:y1, x0:x1][letter] == 0).mean() > 0.9
    rgb = overlay(film, heat, "jet", 1.0)
    cold = colormap_lut("jet")[0]
    assert (rgb[y0:y1, x0:x1][letter] == cold).all(axis=-1).mean() > 0.9


def test_apply_mask_rescales_and_warns_when_nothing_is_left():
    cam = np.zeros((10, 10), np.float32)
    cam[2:4, 2:4] = 0.5
    cam[8, 8] = 1.0
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    masked, warning = apply_mask(cam, mask)
    assert warning == "" and masked.max() == 1.0 and masked[8, 8] == 0
    empty, warning = apply_mask(cam, np.zeros_like(mask))
    assert "zero inside the body mask" in warning and empty.max() == 0


def test_crf_refines_towards_the_film_edges():
    film = np.zeros((80, 100), np.float32)
    film[20:60, 30:70] = 0.9                        # a bright square on a dark film
    cam = np.zeros_like(film)
    cam[15:65, 25:75] = 0.8                         # a map a little larger than the square
    refined = crf_refine(film, cam, CRFParams(iterations=5))
    assert refined.shape == film.shape and refined.min() >= 0 and refined.max() <= 1
    assert not np.allclose(refined, cam)
    inside, ring = refined[25:55, 35:65].mean(), refined[15:19, 25:75].mean()
    assert inside > 0.5 and inside > ring
