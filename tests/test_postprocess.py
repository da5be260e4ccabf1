import numpy as np

from attention_map.postprocess import CRFParams, apply_mask, crf_refine


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
