"""Load a film from PNG, JPEG, DICOM or a frame of a video clip as a grey float32 array in [0, 1] at its original
resolution."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The size limit is checked by load_film itself, from the header, with a message naming the setting.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image that cannot be used; the message is one line and names the reason."""


@dataclass(frozen=True)
class Film:
    """A decoded film: pixels (H, W) float32 in [0, 1], white = dense; the frame it is of a multi-frame object
    (None for a single image); and what the reader had to assume, for the manifest's `warning` (empty if nothing)."""
    pixels: np.ndarray
    frame: int | None = None
    warning: str = ""


def _is_dicom(path: Path) -> bool:
    """By name (.dcm, .dicom), by the 'DICM' prefix after the preamble, or, for files written without preamble or
    file meta, by a first element of group 0002 (little endian) or 0008 (either byte order)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as handle:
        head = handle.read(132)
    return (len(head) == 132 and head[128:132] == b"DICM") or head[:2] in (b"\x08\x00", b"\x02\x00", b"\x00\x08")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the weights PIL uses for RGB -> L."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _scale_to_unit(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height / 1e6:.1f} MP, above "
                         f"MAX_IMAGE_PIXELS={max_pixels}")


def _one_line(error: BaseException) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(error).strip()) or type(error).__name__


def _read_dicom(path: Path, stop_before_pixels: bool = False):
    """The dataset, and a warning when it had to be read without the preamble or a stated transfer syntax.

    Files without the preamble and file meta (older systems write them) are read in pydicom's force mode. A
    transfer syntax that the file does not state is taken from the dataset itself: byte order and VR from how it
    parsed, the compression of encapsulated pixel data from the first fragment's codestream."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    forced = False
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        dataset, forced = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels), True
        if not any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028, 0x7FE0) for tag in dataset.keys()):
            raise ImageError("not an image: neither DICOM (no preamble, file meta or DICOM elements) "
                             "nor PNG/JPEG") from None
    if getattr(dataset, "file_meta", None) is None:
        dataset.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" in dataset.file_meta:
        return dataset, "DICOM without the 128-byte preamble, read in force mode" if forced else ""
    syntax = dataset.file_meta.TransferSyntaxUID = _syntax_of(dataset)
    return dataset, (f"DICOM without {'preamble and file meta' if forced else 'a transfer syntax in its file meta'}: "
                     f"read as {syntax.name}, taken from the dataset itself")


def _syntax_of(dataset):
    """The transfer syntax a header-less dataset was written in."""
    from pydicom import uid
    from pydicom.encaps import generate_frames

    implicit, little = dataset.original_encoding
    if implicit is None:
        raise ImageError("DICOM without file meta information whose encoding cannot be told")
    if "PixelData" not in dataset or not dataset["PixelData"].is_undefined_length:
        return (uid.ImplicitVRLittleEndian if implicit else
                uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    stream = next(generate_frames(dataset.PixelData, number_of_frames=1), b"")
    if stream[:4] == b"\xff\x4f\xff\x51" or stream[4:8] == b"jP  ":
        return uid.JPEG2000
    if stream[:2] == b"\xff\xd8":   # JPEG: the start-of-frame marker says which process
        for marker, syntax in ((b"\xff\xc0", uid.JPEGBaseline8Bit), (b"\xff\xc1", uid.JPEGExtended12Bit),
                               (b"\xff\xc3", uid.JPEGLossless), (b"\xff\xf7", uid.JPEGLSNearLossless)):
            if marker in stream[:4096]:
                return syntax
    if len(stream) >= 64 and 1 <= int.from_bytes(stream[:4], "little") <= 15 and stream[4:8] == b"\x40\0\0\0":
        return uid.RLELossless
    raise ImageError("DICOM without file meta information holds compressed pixel data of an unknown kind")


# pydicom tries pylibjpeg first where it is installed. Pillow decoded 8-bit JPEG before pylibjpeg was a dependency:
# it stays first, so maps of earlier runs are reproduced (the two differ by a grey level), in half the time; pyjpegls
# loads JPEG-LS in a third of pylibjpeg's time (benchmarks/bench_loader.py --pydicom-order). The other installed
# plugins are the fallback.
_PREFERRED_PLUGIN = {"1.2.840.10008.1.2.4.50": "pillow", "1.2.840.10008.1.2.4.51": "pillow",
                     "1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}


def _decode(dataset, index: int | None) -> np.ndarray:
    """The pixels of frame `index` (None: the only frame), decoded alone, by the preferred plugin where it can."""
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.TransferSyntaxUID
    preferred = _PREFERRED_PLUGIN.get(str(syntax))
    if preferred and preferred in get_decoder(syntax).available_plugins:
        try:
            dataset.pixel_array_options(index=index, decoding_plugin=preferred)
            return dataset.pixel_array
        except Exception:  # noqa: BLE001  (e.g. Pillow and 12-bit JPEG: the other plugins may read it)
            pass
    dataset.pixel_array_options(index=index)
    return dataset.pixel_array


def _decode_failure(dataset, error: BaseException) -> str:
    """One line saying which transfer syntax failed, and for a missing decoder, what to install."""
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.TransferSyntaxUID   # _read_dicom made sure there is one
    named = f"{syntax.name} ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unreadable DICOM: no decoder exists for the transfer syntax {named}"
    if not decoder.available_plugins and decoder.missing_dependencies:
        # pydicom says e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"; pip names only
        choices = [re.sub(r"\bgdcm\b", "python-gdcm", d.split(" - requires ")[-1]).replace("numpy and ", "")
                   for d in decoder.missing_dependencies]
        return (f"unreadable DICOM: no decoder for the transfer syntax {named} is installed; "
                f"pip install one of: {' | '.join(choices)}")
    return f"unreadable DICOM: {named} pixel data: {_one_line(error)}"


VIDEO_SUFFIXES = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm")


def is_video(path: Path) -> bool:
    """A clip (MP4, AVI, MOV, MKV, WebM; decoded by OpenCV's FFmpeg), by its name."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _open_video(path: Path):
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ImageError("unreadable video: no decoder could open it")
    return capture


def _video_frames(capture) -> int:
    """The clip's frame count from its container, or, where the container does not say, by decoding it."""
    import cv2

    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if count > 0:
        return count
    while capture.grab():
        count += 1
    return count


def _load_video(path: Path, max_pixels: int | None, frame: int | str) -> Film:
    import cv2

    capture = _open_video(path)
    try:
        _check_size(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), max_pixels)
        frames = _video_frames(capture)
        if frames == 0:
            raise ImageError("video holds no frames")
        index = _frame_index(frame, frames, "video")
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, image = capture.read()
    finally:
        capture.release()
    if not ok or image is None:
        raise ImageError(f"video: frame {index} of {frames} could not be decoded")
    rgb = image[..., ::-1].astype(np.float64) / 255.0          # OpenCV decodes to BGR
    return Film(_luminance(rgb).astype(np.float32), index)


def frame_rate(path: Path, default: float = 10.0) -> float:
    """Frames per second of a clip (its container's rate) or a cine DICOM (RecommendedDisplayFrameRate, CineRate or
    1000 / FrameTime), else `default`."""
    try:
        if is_video(path):
            import cv2

            capture = _open_video(path)
            rate = capture.get(cv2.CAP_PROP_FPS)
            capture.release()
            return float(rate) if rate and rate > 0 else default
        if _is_dicom(Path(path)):
            dataset, _ = _read_dicom(Path(path), stop_before_pixels=True)
            for name in ("RecommendedDisplayFrameRate", "CineRate"):
                if dataset.get(name):
                    return float(dataset.get(name))
            if dataset.get("FrameTime"):
                return 1000.0 / float(dataset.get("FrameTime"))
    except Exception:  # noqa: BLE001  (the rate only paces the overlay clip)
        pass
    return default


def frame_count(path: Path) -> int:
    """How many frames the file holds (1 for PNG/JPEG and single-frame DICOM), read from the header only (a video
    whose container does not say is decoded to count them; 0 for a clip without frames).

    Unreadable files count 1: loading them reports the error."""
    path = Path(path)
    try:
        if is_video(path):
            capture = _open_video(path)
            count = _video_frames(capture)
            capture.release()
            return count
        if not _is_dicom(path):
            return 1
        dataset, _ = _read_dicom(path, stop_before_pixels=True)
        return max(1, int(dataset.get("NumberOfFrames", 1) or 1))
    except Exception:  # noqa: BLE001  (any broken header: the load says what is wrong)
        return 1


def _frame_index(frame: int | str, frames: int, kind: str = "DICOM") -> int:
    if frame == "first":
        return 0
    if frame == "middle":
        return frames // 2
    if not 0 <= int(frame) < frames:
        raise ImageError(f"frame {frame} asked of a {kind} with {frames} frames")
    return int(frame)


def _load_dicom(path: Path, max_pixels: int | None, frame: int | str) -> Film:
    try:
        dataset, warning = _read_dicom(path)
        _check_size(int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0), max_pixels)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except ImageError:
        raise
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageError(f"unreadable DICOM: {_one_line(error)}") from None
    if not any(name in dataset for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(dataset.get("SOPClassUID"), "name", "") or "not stated"
        raise ImageError(f"DICOM holds no pixel data (SOP class: {kind}): not an image")
    index = _frame_index(frame, frames)
    index = index if frames > 1 else None   # a single image is not a frame of anything
    try:
        pixels = _decode(dataset, index)
    except Exception as error:  # noqa: BLE001
        raise ImageError(_decode_failure(dataset, error)) from None
    try:
        film = _grey(pixels, dataset)
    except Exception as error:  # noqa: BLE001  (a malformed palette or LUT)
        raise ImageError(f"unreadable DICOM: {_one_line(error)}") from None
    return Film(film, index, warning)


def _grey(pixels: np.ndarray, dataset) -> np.ndarray:
    """Decoded pixels as the film in [0, 1], white = dense."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":   # stored values index the palette: look them up first
        pixels = apply_color_lut(pixels, dataset)
    if pixels.ndim == 3:  # colour (RGB; YBR converted to RGB by pydicom): as luminance
        return _scale_to_unit(_luminance(pixels.astype(np.float64)))
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    film = _scale_to_unit(apply_voi_lut(values, dataset, prefer_lut=True).astype(np.float64))
    return 1.0 - film if photometric == "MONOCHROME1" else film   # MONOCHROME1: low values are bright


STORED_BITS = (8, 10, 12, 14)     # the sample depths that 16-bit PNGs are written from


def _sixteen_bit(values: np.ndarray) -> Film:
    """A 16-bit (or 32-bit integer) raster: 0..65535 is 0..1. A film converted from DICOM often keeps its stored
    values (12 bits: at most 4095), and one converted from 8 bits its 0..255, which read so would be a film near
    black that the model cannot read: a film whose values stay within 8, 10, 12 or 14 bits is read on that range, and
    its heatmaps' warning says so."""
    high = float(values.max())
    bits = next((bits for bits in STORED_BITS if high <= 2 ** bits - 1), None) if high > 0 else None
    if bits is not None:
        return Film((values / (2 ** bits - 1)).clip(0, 1).astype(np.float32),
                    warning=f"a 16-bit image whose values stay within {bits} bits (up to {high:.0f}): read as "
                            f"0..{2 ** bits - 1}")
    return Film((values / max(65535.0, high)).clip(0, 1).astype(np.float32))


def _load_raster(path: Path, max_pixels: int | None) -> Film:
    try:
        with Image.open(path) as image:
            _check_size(*image.size, max_pixels)   # from the header, before any pixel is decoded
            image = ImageOps.exif_transpose(image)
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                return _sixteen_bit(np.asarray(image, dtype=np.float64))
            if mode == "F":
                return Film(_scale_to_unit(np.asarray(image, dtype=np.float64)))
            if mode in ("1", "L", "LA"):
                return Film(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
            # RGB, RGBA, P (palette), CMYK, YCbCr...: the colour channels, alpha ignored
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
            return Film(_luminance(rgb).astype(np.float32))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"unreadable image: {str(error).splitlines()[0]}") from None


NOT_FOUND = "file not found"     # the start of a missing image's reason (the run's summary looks for it)


def read_film(path: Path, max_pixels: int | None = None, frame: int | str = "first") -> Film:
    """The film at `path` with the frame it is and the reader's warning (see Film).

    PNG/JPEG: 8- and 16-bit, grey, RGB, RGBA and palette. DICOM: every transfer syntax that pydicom and the
    installed decoders read, with or without preamble and file meta; modality LUT (rescale), VOI LUT or window,
    MONOCHROME1 inverted, PALETTE COLOR, RGB and YBR as luminance; of a multi-frame object or a video clip (by its
    name: VIDEO_SUFFIXES) the frame `frame` (an index, "first" or "middle"). Images above `max_pixels` are refused
    from their header.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{NOT_FOUND}: {path}")        # the path looked at: IMAGE_ROOT joined
    if not path.is_file():
        raise ImageError("not a file")
    if is_video(path):
        film = _load_video(path, max_pixels, frame)
    else:
        film = _load_dicom(path, max_pixels, frame) if _is_dicom(path) else _load_raster(path, max_pixels)
    if film.pixels.ndim != 2 or min(film.pixels.shape) < 2:
        raise ImageError(f"image of shape {film.pixels.shape} is too small or not 2-D")
    return Film(np.ascontiguousarray(film.pixels, dtype=np.float32), film.frame, film.warning)


def load_film(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """The pixels of `read_film(path, max_pixels)`: float32 (H, W) in [0, 1], white = dense (bone)."""
    return read_film(path, max_pixels).pixels
