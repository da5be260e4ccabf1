"""Load a film from PNG, JPEG or DICOM as a grey float32 array in [0, 1] at its original resolution."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The size limit is checked by load_film itself, from the header, with a message naming the setting.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image that cannot be used; the message is one line and names the reason."""


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


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


def _load_dicom(path: Path, max_pixels: int | None) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
        _check_size(int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0), max_pixels)
        pixels = dataset.pixel_array
    except ImageError:
        raise
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageError(f"unreadable DICOM: {str(error).splitlines()[0]}") from None
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:  # colour DICOM: already converted to RGB by pydicom
        return _scale_to_unit(_luminance(pixels.astype(np.float64)))
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    values = apply_voi_lut(values, dataset, prefer_lut=True).astype(np.float64)
    film = _scale_to_unit(values)
    if photometric == "MONOCHROME1":  # low values are bright: invert so that bone is white
        film = 1.0 - film
    return film


def _load_raster(path: Path, max_pixels: int | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            _check_size(*image.size, max_pixels)   # from the header, before any pixel is decoded
            image = ImageOps.exif_transpose(image)
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return (np.asarray(image, dtype=np.float64) / 65535.0).astype(np.float32)
            if mode == "I":
                values = np.asarray(image, dtype=np.float64)
                return (values / (65535.0 if values.max() <= 65535 else values.max())).clip(0, 1).astype(np.float32)
            if mode == "F":
                return _scale_to_unit(np.asarray(image, dtype=np.float64))
            if mode in ("1", "L", "LA"):
                return (np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
            # RGB, RGBA, P (palette), CMYK, YCbCr...: the colour channels, alpha ignored
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
            return _luminance(rgb).astype(np.float32)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"unreadable image: {str(error).splitlines()[0]}") from None


def load_film(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """The film at `path` as float32 (H, W) in [0, 1], white = dense (bone).

    PNG/JPEG: 8- and 16-bit, grey, RGB, RGBA and palette. DICOM: modality LUT (rescale), VOI LUT or window,
    MONOCHROME1 inverted. Images above `max_pixels` are refused from their header.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError("file not found")
    if not path.is_file():
        raise ImageError("not a file")
    film = _load_dicom(path, max_pixels) if _is_dicom(path) else _load_raster(path, max_pixels)
    if film.ndim != 2 or min(film.shape) < 2:
        raise ImageError(f"image of shape {film.shape} is too small or not 2-D")
    return np.ascontiguousarray(film, dtype=np.float32)
