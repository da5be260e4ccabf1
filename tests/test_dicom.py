"""DICOMs as archives store them: pydicom's own test files (every transfer syntax it covers), files without preamble
or file meta, multi-frame objects (DICOM_FRAME) and the photometric interpretations."""
import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from attention_map.images import ImageError, frame_count, load_film, read_film

from test_cli import cli, read_manifest

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SHARED_DICOMS = ["dicom/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "dicom/Fake_MONOHR1.dcm",
                 "derived/00009745_000_mono1_12bit.dcm"]

# pydicom's test files that hold no image, or whose pixels no installed decoder reads, and the reason each gets.
# Every other file must give a heatmap.
NOT_IMAGES = {
    "JPEG-lossy.dcm": "JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51) pixel data: Unable to decode",
    "JPEG2000-embedded-sequence-delimiter.dcm": "JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91) pixel data",
    "MR_truncated.dcm": "pixel data is less than expected",
    "badVR.dcm": "invalid literal for int()",
    "meta_missing_tsyntax.dcm": "Implicit VR Little Endian (1.2.840.10008.1.2) pixel data: Missing required element",
    "nested_priv_SQ.dcm": "Missing required element: (0028,0100) 'Bits Allocated'",
    "no_meta.dcm": "not an image",
    "ExplVR_BigEndNoMeta.dcm": "holds no pixel data (SOP class: RT Ion Plan Storage)",
    "ExplVR_LitEndNoMeta.dcm": "holds no pixel data (SOP class: RT Ion Plan Storage)",
    "rtstruct.dcm": "holds no pixel data (SOP class: RT Structure Set Storage)",
    "rtplan.dcm": "holds no pixel data (SOP class: RT Plan Storage)",
    "rtplan_truncated.dcm": "holds no pixel data",
    "test-SR.dcm": "holds no pixel data (SOP class: Comprehensive SR Storage)",
    "reportsi.dcm": "holds no pixel data (SOP class: Basic Text SR Storage)",
    "reportsi_with_empty_number_tags.dcm": "holds no pixel data",
    "waveform_ecg.dcm": "holds no pixel data (SOP class: 12-lead ECG Waveform Storage)",
    "UN_sequence.dcm": "holds no pixel data",
    "empty_charset_LEI.dcm": "holds no pixel data",
    "no_meta_group_length.dcm": "holds no pixel data",
    "priv_SQ.dcm": "holds no pixel data",
}


def _records(path: Path, names: list[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "question", "answer"])
        writer.writerows([name, "Is there a nodule?", "no"] for name in names)
    return path


def _errors(folder: Path) -> dict[str, str]:
    if not (folder / "errors.csv").exists():
        return {}
    with open(folder / "errors.csv", newline="") as handle:
        return {row["image_path"]: row["reason"] for row in csv.DictReader(handle)}


def test_every_pydicom_test_file_gives_a_heatmap_or_its_one_line_reason(tmp_path, tiny_model):
    names = sorted(p.name for p in PYDICOM_FILES.glob("*.dcm"))
    assert len(names) >= 78
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={_records(tmp_path / 'records.csv', names)}", f"IMAGE_ROOT={PYDICOM_FILES}",
                 f"MODEL={tiny_model}", f"OUTPUT_DIR={out}")
    assert result.returncode == 3, result.stderr
    rows = read_manifest(out)
    drawn = {row["source_image"] for row in rows}
    assert all((out / row["image_path"]).is_file() for row in rows)
    errors = _errors(out)
    for name in names:
        if name in NOT_IMAGES:
            assert name in errors, f"{name} was drawn; expected: {NOT_IMAGES[name]}"
            assert NOT_IMAGES[name] in errors[name] and "\n" not in errors[name], (name, errors[name])
            assert not errors[name].rstrip().endswith(":"), f"{name}: reason cut short: {errors[name]}"
        else:
            assert name in drawn, f"{name}: {errors.get(name)}"
    # with pylibjpeg's libjpeg and openjpeg plugins and pyjpegls: JPEG Lossless, JPEG-LS and 12-bit JPEG decode
    assert len(drawn) >= 58
    for name in ("SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm",
                 "SC_rgb_jls_lossy_line.dcm", "JPGExtended.dcm", "GDCMJ2K_TextGBR.dcm"):
        assert name in drawn


def test_a_missing_decoder_names_the_transfer_syntax_and_the_packages_to_install(tmp_path):
    """With the JPEG-LS decoders' modules made unimportable, the reason says what to install, on one line."""
    script = ("import sys\n"
              "for name in ('jpeg_ls', 'libjpeg', 'pylibjpeg', 'gdcm', 'openjpeg'):\n"
              "    sys.modules[name] = None\n"
              "from attention_map.images import ImageError, load_film\n"
              "try:\n"
              f"    load_film({str(PYDICOM_FILES / 'MR_small_jpeg_ls_lossless.dcm')!r})\n"
              "except ImageError as error:\n"
              "    print(error)\n")
    reason = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert reason.count("\n") == 1, reason
    assert "no decoder for the transfer syntax JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in reason
    for package in ("pyjpegls", "pylibjpeg-libjpeg", "python-gdcm"):
        assert package in reason


def _strip_header(source: Path, target: Path, implicit: bool, little: bool = True) -> Path:
    """`source` written as older systems did: no 128-byte preamble, no file meta information."""
    dataset = pydicom.dcmread(source)
    if not little:   # pydicom writes pixel data as it is: 16-bit samples are swapped here
        dataset.PixelData = dataset.pixel_array.astype(">u2").tobytes()
    dataset.preamble = None
    del dataset.file_meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    target.write_bytes(buffer.getvalue())
    return target


def test_header_less_shared_dicoms_give_the_same_map_as_the_originals(tmp_path, tiny_model, cxr):
    (tmp_path / "films").mkdir()
    names, pairs = [], []
    for original in SHARED_DICOMS:
        names.append(original)
        uncompressed = not pydicom.dcmread(cxr / original, stop_before_pixels=True).file_meta.TransferSyntaxUID \
            .is_compressed
        for implicit, little in [(True, True), (False, True)] + ([(False, False)] if uncompressed else []):
            kind = "implicit" if implicit else "explicit-" + ("le" if little else "be")
            stripped = _strip_header(cxr / original, tmp_path / "films" / f"{Path(original).stem}_{kind}.dcm",
                                     implicit, little)
            assert stripped.read_bytes()[128:132] != b"DICM"
            with pytest.raises(pydicom.errors.InvalidDicomError):
                pydicom.dcmread(stripped)          # plain pydicom refuses it
            names.append(str(stripped))
            pairs.append((original, str(stripped)))
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={_records(tmp_path / 'records.csv', names)}", f"IMAGE_ROOT={cxr}",
                 "ALLOW_OUTSIDE_IMAGE_ROOT=true", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "SAVE_RAW_CAM=true")
    assert result.returncode == 0, result.stderr
    rows = {row["source_image"]: row for row in read_manifest(out)}
    assert len(rows) == len(names) == 3 + 7
    for original, stripped in pairs:
        assert np.array_equal(load_film(cxr / original), load_film(Path(stripped)))
        assert (out / rows[original]["raw_map"]).read_bytes() == (out / rows[stripped]["raw_map"]).read_bytes()
        assert rows[original]["warning"] == ""
        assert "DICOM without preamble and file meta: read as" in rows[stripped]["warning"]


def test_a_file_that_is_not_dicom_at_all_is_not_an_image(tmp_path):
    (tmp_path / "text.dcm").write_text("this is not an image\n" * 20)
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for name in ("text.dcm", "noise.dcm"):
        with pytest.raises(ImageError, match="^not an image") as caught:
            load_film(tmp_path / name)
        assert "\n" not in str(caught.value)


def _secondary_capture(shape: tuple[int, int], photometric: str, bits: int, stored: int) -> Dataset:
    """The header of a one-sample-per-pixel Secondary Capture image, explicit VR little endian."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, stored, stored - 1, 0
    return dataset


def _cine(path: Path, frames: np.ndarray, compress: bool) -> Path:
    """A multi-frame 12-bit MONOCHROME2 object holding `frames` (N, H, W) uint16, RLE-compressed or not."""
    dataset = _secondary_capture(frames.shape[1:], "MONOCHROME2", 16, 12)
    dataset.NumberOfFrames = len(frames)
    dataset.PixelData = frames.astype(np.uint16).tobytes()
    if compress:
        dataset.compress(RLELossless)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _frames(cxr: Path) -> np.ndarray:
    film = np.round(load_film(cxr / "nih" / "00000001_000.png")[::4, ::4] * 4095).astype(np.uint16)
    return np.stack([film, film[:, ::-1], np.roll(film, 60, axis=0)])


@pytest.mark.parametrize("compress", [False, True])
def test_each_frame_of_a_multi_frame_dicom_is_read_alone(tmp_path, cxr, compress):
    frames = _frames(cxr)
    path = _cine(tmp_path / "cine.dcm", frames, compress)
    assert frame_count(path) == 3 and frame_count(cxr / "nih" / "00000001_000.png") == 1
    for frame, expected in [("first", 0), ("middle", 1), (0, 0), (1, 1), (2, 2)]:
        film = read_film(path, frame=frame)
        truth = frames[expected].astype(np.float64)
        assert film.frame == expected
        assert np.abs(film.pixels - (truth - truth.min()) / (truth.max() - truth.min())).max() < 1e-6
    assert read_film(cxr / "nih" / "00000001_000.png").frame is None
    with pytest.raises(ImageError, match="frame 3 asked of a DICOM with 3 frames"):
        read_film(path, frame=3)


def test_dicom_frame_all_gives_one_map_per_frame_and_the_manifest_says_which(tmp_path, tiny_model, cxr):
    _cine(tmp_path / "cine.dcm", _frames(cxr), compress=True)
    Path(tmp_path / "single.png").write_bytes((cxr / "nih" / "00000001_000.png").read_bytes())
    data = _records(tmp_path / "records.csv", ["cine.dcm", "single.png"])
    runs = {}
    for mode in ("first", "middle", "all"):
        out = tmp_path / mode
        result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", f"DICOM_FRAME={mode}",
                     "SAVE_RAW_CAM=true")
        assert result.returncode == 0, result.stderr
        runs[mode] = {row["image_path"]: row for row in read_manifest(out)}
    assert {name: row["frame"] for name, row in runs["all"].items()} == {
        "cine_idx0_f0.png": "0", "cine_idx0_f1.png": "1", "cine_idx0_f2.png": "2", "single_idx1.png": ""}
    assert [row["frame"] for row in runs["first"].values()] == ["0", ""]
    assert [row["frame"] for row in runs["middle"].values()] == ["1", ""]
    raw = {mode: {name: (tmp_path / mode / row["raw_map"]).read_bytes() for name, row in rows.items()}
           for mode, rows in runs.items()}
    assert raw["all"]["cine_idx0_f0.png"] == raw["first"]["cine_idx0.png"]
    assert raw["all"]["cine_idx0_f1.png"] == raw["middle"]["cine_idx0.png"]
    assert raw["all"]["cine_idx0_f0.png"] != raw["all"]["cine_idx0_f1.png"]
    clip = cv2.VideoCapture(str(tmp_path / "all" / "cine_idx0.mp4"))        # the frames' overlays as one clip
    assert clip.get(cv2.CAP_PROP_FRAME_COUNT) == 3 and not (tmp_path / "first" / "cine_idx0.mp4").exists()

    # the gallery shows each map beside the frame it explains
    assert cli("report", str(tmp_path / "all")).returncode == 0
    html = (tmp_path / "all" / "index.html").read_text()
    films = re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)" alt="film">', html)
    assert len(films) == 4 and len(set(films[:3])) == 3

    # a rerun makes nothing and keeps each row's frame; another DICOM_FRAME redoes the film
    again = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={tmp_path / 'all'}",
                "DICOM_FRAME=all", "SAVE_RAW_CAM=true")
    assert "0 heatmaps written" in again.stdout and "4 already done" in again.stdout
    assert [row["frame"] for row in read_manifest(tmp_path / "all")] == ["0", "1", "2", ""]
    other = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={tmp_path / 'first'}",
                "DICOM_FRAME=middle", "SAVE_RAW_CAM=true")
    assert "2 heatmaps written" in other.stdout


def test_images_outside_image_root_are_read_from_where_they_are_when_allowed(tmp_path, tiny_model, cxr):
    data = _records(tmp_path / "records.csv", [str(cxr / "nih" / "00000001_000.png")])
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}",
                 "ALLOW_OUTSIDE_IMAGE_ROOT=true")
    assert result.returncode == 0, result.stderr
    [row] = read_manifest(out)
    assert row["image_path"].startswith("outside/") and (out / row["image_path"]).is_file()


def _palette_dicom(path: Path, indices: np.ndarray) -> Path:
    """8-bit PALETTE COLOR whose palette maps index i to the grey 255 - i: an inverted film."""
    dataset = _secondary_capture(indices.shape, "PALETTE COLOR", 8, 8)
    lut = ((255 - np.arange(256)) * 257).astype(np.uint16)
    for colour in ("Red", "Green", "Blue"):
        setattr(dataset, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(dataset, f"{colour}PaletteColorLookupTableData", lut.tobytes())
    dataset.PixelData = indices.astype(np.uint8).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_palette_colour_is_looked_up_before_it_is_read_as_grey(tmp_path, cxr):
    indices = np.round(load_film(cxr / "nih" / "00000001_000.png")[::8, ::8] * 255).astype(np.uint8)
    film = load_film(_palette_dicom(tmp_path / "palette.dcm", indices))
    grey = 255.0 - indices
    assert np.abs(film - (grey - grey.min()) / (grey.max() - grey.min())).max() < 1e-6


@pytest.mark.parametrize("name", ["SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
                                  "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm"])
def test_ybr_full_and_422_read_as_the_luminance_of_the_same_rgb_image(name):
    """pydicom's test files hold one picture in RGB and in YBR_FULL / YBR_FULL_422 (JPEG and uncompressed)."""
    assert str(pydicom.dcmread(PYDICOM_FILES / name).PhotometricInterpretation).startswith("YBR_FULL")
    reference = load_film(PYDICOM_FILES / "SC_rgb_dcmtk_+eb+cr.dcm")
    film = load_film(PYDICOM_FILES / name)
    assert film.shape == reference.shape
    assert np.abs(film - reference).max() < 0.04 and np.abs(film - reference).mean() < 0.01


def test_jpeg_baseline_is_decoded_as_earlier_runs_did(cxr):
    """Pillow read 8-bit JPEG DICOMs before pylibjpeg was installed beside it; pylibjpeg's pixels differ by a grey
    level, so the loader keeps Pillow first and earlier runs' maps are reproduced."""
    path = cxr / SHARED_DICOMS[0]
    decoded = {}
    for plugin in ("pillow", "pylibjpeg"):
        dataset = pydicom.dcmread(path)
        dataset.pixel_array_options(decoding_plugin=plugin)
        decoded[plugin] = dataset.pixel_array.astype(np.float64)
    assert not np.array_equal(decoded["pillow"], decoded["pylibjpeg"])
    pillow = decoded["pillow"]
    assert np.array_equal(load_film(path), ((pillow - pillow.min()) / (pillow.max() - pillow.min())).astype(np.float32))


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_rgb_reads_as_its_bt601_luminance(name):
    rgb = pydicom.dcmread(PYDICOM_FILES / name).pixel_array.astype(np.float64)
    assert rgb.ndim == 3 and rgb.shape[-1] == 3
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    expected = (luma - luma.min()) / (luma.max() - luma.min())
    assert np.abs(load_film(PYDICOM_FILES / name) - expected).max() < 1e-6
