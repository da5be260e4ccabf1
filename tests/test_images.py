import numpy as np
import pytest
from PIL import Image

from attention_map.images import ImageError, load_film, read_film


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_eight_and_sixteen_bit_png_give_the_same_film(cxr):
    eight = load_film(cxr / "nih" / "00009745_000.png")
    sixteen = load_film(cxr / "derived" / "00009745_000_uint16.png")
    assert eight.dtype == np.float32 and eight.shape == (1024, 1024)
    assert np.abs(eight - sixteen).max() < 1e-6


def test_monochrome1_dicom_is_inverted_to_match_the_png(cxr):
    png = load_film(cxr / "nih" / "00009745_000.png")
    dicom = load_film(cxr / "derived" / "00009745_000_mono1_12bit.dcm")
    assert dicom.shape == png.shape and dicom.min() >= 0 and dicom.max() <= 1
    assert _corr(png, dicom) > 0.99


def test_monochrome1_tag_inverts_the_same_stored_pixels(cxr):
    import pydicom

    mono2_path = cxr / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    mono1_path = cxr / "dicom" / "Fake_MONOHR1.dcm"
    # the two files store the same pixels; only PhotometricInterpretation differs
    assert (pydicom.dcmread(mono1_path).pixel_array == pydicom.dcmread(mono2_path).pixel_array).all()
    mono2, mono1 = load_film(mono2_path), load_film(mono1_path)
    assert np.abs((1 - mono1) - mono2).max() < 1e-6


def test_rgba_film_reads_as_grey(cxr):
    film = load_film(cxr / "nih" / "00001369_000.png")
    assert film.ndim == 2 and film.shape == (1024, 1024) and 0 < film.mean() < 1


# JPEG holds no alpha, palette or 16-bit samples, so it is tested in grey and RGB only.
@pytest.mark.parametrize("mode, suffix", [(m, ".png") for m in ("L", "RGB", "RGBA", "P", "I;16")]
                         + [("L", ".jpg"), ("RGB", ".jpg")])
def test_modes_and_formats(tmp_path, mode, suffix):
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    image = Image.fromarray(ramp, "L")
    if mode == "I;16":
        image = Image.fromarray(ramp.astype(np.uint16) * 257)
    elif mode != "L":
        image = image.convert(mode)
    path = tmp_path / f"film{suffix}"
    image.save(path)
    film = load_film(path)
    assert film.shape == (48, 64)
    assert np.abs(film - ramp / 255.0).max() < 0.03


@pytest.mark.parametrize("bits", [8, 12, 14])
def test_a_16_bit_png_of_fewer_bits_reads_on_their_range_with_a_warning(tmp_path, bits):
    # PNGs converted from DICOM often keep the stored 12-bit values, and some hold 8-bit values in 16 bits; read as
    # 0..65535 they were films near black
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    top = 2 ** bits - 1
    Image.fromarray((ramp.astype(np.int64) * top // 255).astype(np.uint16)).save(tmp_path / "few.png")
    film = read_film(tmp_path / "few.png")
    assert np.abs(film.pixels - ramp / 255.0).max() < 1 / top + 1e-6
    assert film.warning == f"a 16-bit image whose values stay within {bits} bits (up to {top}): read as 0..{top}"
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")   # the full range: as it is
    assert read_film(tmp_path / "sixteen.png").warning == ""


def test_unreadable_files_raise_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    for name, words in [("empty.png", "unreadable"), ("text.png", "unreadable"), ("folder.png", "not a file"),
                        ("missing.png", "not found")]:
        with pytest.raises(ImageError, match=words) as caught:
            load_film(tmp_path / name)
        assert "\n" not in str(caught.value)
