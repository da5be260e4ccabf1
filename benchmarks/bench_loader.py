"""Seconds to load one film, per kind of file, with attention_map.images.load_film.

    .venv/bin/python benchmarks/bench_loader.py [--repeats 20] [--cxr ../shared/data/cxr] [--pydicom-order]

Reads the real films in ../shared/data/cxr (PNG 8- and 16-bit, JPEG-baseline DICOM, 12-bit uncompressed MONOCHROME1
DICOM) and, made from them in a temporary folder, the same 12-bit DICOM without preamble and file meta, RLE- and
JPEG-LS-compressed copies, and a 3-frame RLE object (one frame decoded). Prints the median and the fastest of
`--repeats` loads of each. To compare two versions of the loader, run it from each checkout on the same machine.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_map import images  # noqa: E402
from attention_map.images import load_film  # noqa: E402

CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def derived_films(folder: Path, cxr: Path) -> dict[str, Path]:
    """Copies of the 12-bit DICOM in other containers: without header, RLE, JPEG-LS, and 3 frames (RLE). A copy
    whose encoder is not installed is left out, saying so."""
    import pydicom
    from pydicom.uid import JPEGLSLossless, RLELossless

    source = cxr / "derived" / "00009745_000_mono1_12bit.dcm"

    def headerless(path: Path) -> None:
        dataset = pydicom.dcmread(source)
        dataset.preamble = None
        del dataset.file_meta
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset, implicit_vr=True, little_endian=True, enforce_file_format=False)
        path.write_bytes(buffer.getvalue())

    def compressed(syntax, frames: int = 1):
        def write(path: Path) -> None:
            dataset = pydicom.dcmread(source)
            if frames > 1:
                pixels = dataset.pixel_array
                dataset.NumberOfFrames = frames
                dataset.PixelData = np.stack([pixels, pixels[::-1], pixels[:, ::-1]][:frames]).tobytes()
            dataset.compress(syntax)
            dataset.save_as(path)
        return write

    makers = {"DICOM 12-bit, no preamble or file meta": headerless,
              "DICOM 12-bit, RLE": compressed(RLELossless),
              "DICOM 12-bit, JPEG-LS lossless": compressed(JPEGLSLossless),
              "DICOM 12-bit, 3 frames RLE (first)": compressed(RLELossless, frames=3)}
    films = {}
    for number, (name, make) in enumerate(makers.items()):
        try:
            make(folder / f"{number}.dcm")
            films[name] = folder / f"{number}.dcm"
        except Exception as error:  # noqa: BLE001  (an encoder that is not installed)
            print(f"{name}: not made: {str(error).splitlines()[0]}")
    return films


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cxr", type=Path, default=CXR, help="the shared chest X-ray folder (default: %(default)s)")
    parser.add_argument("--pydicom-order", action="store_true",
                        help="decode with pydicom's own choice of plugin, not the loader's preferred ones")
    args = parser.parse_args()
    if args.pydicom_order:
        images._PREFERRED_PLUGIN = {}
    cxr = args.cxr
    if not (cxr / "nih").is_dir():
        sys.exit(f"the real films are not at {cxr}")
    films = {"PNG 8-bit": cxr / "nih" / "00009745_000.png",
             "PNG 16-bit": cxr / "derived" / "00009745_000_uint16.png",
             "DICOM JPEG baseline": cxr / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
             "DICOM 12-bit uncompressed": cxr / "derived" / "00009745_000_mono1_12bit.dcm"}
    with tempfile.TemporaryDirectory() as folder:
        films.update(derived_films(Path(folder), cxr))
        print(f"{'film (1024 x 1024)':42s} {'median ms':>10s} {'fastest ms':>11s}")
        for name, path in films.items():
            try:
                load_film(path)   # warm: imports, first-use set-up
            except Exception as error:  # noqa: BLE001
                print(f"{name:42s} not loaded: {str(error).splitlines()[0]}")
                continue
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                load_film(path)
                seconds.append(time.perf_counter() - started)
            print(f"{name:42s} {statistics.median(seconds) * 1e3:10.1f} {min(seconds) * 1e3:11.1f}")


if __name__ == "__main__":
    main()
