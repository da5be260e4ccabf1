import numpy as np
import pytest

from attention_map.render import BOX_COLOURS, colormap_lut, label_boxes, overlay, raw_map_16bit


@pytest.mark.parametrize("name", ["jet", "turbo", "inferno", "hot", "custom_purple_red"])
def test_high_attention_is_red_or_white_hot(name):
    lut = colormap_lut(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    top, bottom = lut[255].astype(int), lut[0].astype(int)
    red, white_hot = top[0] > 2 * max(top[1], top[2]), top[0] >= 240 and top.sum() > 600
    assert red or white_hot
    assert bottom[2] >= bottom[0] or bottom.sum() < 60     # low attention is blue/purple or black


def test_custom_purple_red_runs_purple_blue_green_yellow_red():
    lut = colormap_lut("custom_purple_red").astype(int)
    assert tuple(lut[0]) == (128, 0, 128)
    assert tuple(lut[64]) == (0, 0, 255) or lut[64][2] > 200
    assert lut[128][1] > lut[128][0] and lut[128][1] > lut[128][2]
    assert lut[191][0] > 200 and lut[191][1] > 200
    assert tuple(lut[255]) == (255, 0, 0)


def test_alpha_blends_film_and_heatmap():
    film = np.linspace(0, 1, 50, dtype=np.float32)[None].repeat(20, 0)
    cam = np.ones_like(film)
    only_film = overlay(film, cam, "jet", 0.0)
    assert (only_film[..., 0] == np.round(film * 255)).all() and (only_film[..., 0] == only_film[..., 2]).all()
    only_heat = overlay(film, cam, "jet", 1.0)
    assert (only_heat == colormap_lut("jet")[255]).all()
    half = overlay(film, cam, "jet", 0.5).astype(int)
    assert np.abs(half - (only_film.astype(int) + only_heat.astype(int)) / 2).max() <= 1


def test_raw_map_is_sixteen_bit_full_scale():
    cam = np.array([[0, 0.5, 1.0]], np.float32)
    raw = raw_map_16bit(cam)
    assert raw.dtype == np.uint16 and raw.tolist() == [[0, 32768, 65535]]


def test_overlay_is_the_blend_formula_within_one_level():
    rng = np.random.default_rng(0)
    film, cam = rng.random((300, 300), dtype=np.float32), rng.random((300, 300), dtype=np.float32)
    for name, alpha in (("jet", 0.5), ("custom_purple_red", 0.35)):
        index = np.round(cam * np.float32(255)).astype(np.uint8)      # the colour index, from fp32 as the maps are
        heat = colormap_lut(name)[index].astype(np.float64)
        expected = np.round((1 - alpha) * 255 * film.astype(np.float64)[..., None] + alpha * heat)
        difference = np.abs(overlay(film, cam, name, alpha).astype(np.float64) - expected)
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, name


def test_label_boxes_outlines_each_box_in_turn_and_leaves_the_rest_of_the_image():
    image = np.full((300, 400, 3), 7, np.uint8)
    drawn = label_boxes(image.copy(), [(50, 100, 150, 200, "nodule 0.91"), (250.4, 120, 390, 290, "effusion 0.60")])
    assert tuple(drawn[150, 50]) == tuple(BOX_COLOURS[0]) and tuple(drawn[200 - 1, 100]) == tuple(BOX_COLOURS[0])
    assert tuple(drawn[200, 250]) == tuple(BOX_COLOURS[1]) and tuple(drawn[290 - 1, 300]) == tuple(BOX_COLOURS[1])
    assert (drawn[150, 100] == 7).all() and (drawn[5, 5] == 7).all()      # inside a box and far from both
    assert (drawn[90:100, 50:100] != 7).any()                              # the label above the first box
