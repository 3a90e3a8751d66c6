"""Reading one image file into the 8-bit picture every encoder's preprocessing starts from.

PNG and JPEG through Pillow; DICOM through pydicom, the way a radiology viewer shows it:
RescaleSlope/Intercept (modality LUT), then the window (VOI LUT: the file's WindowCenter/Width or
VOI LUT sequence, or a window forced in ``data.dicom``), MONOCHROME1 inverted so that high values
are bright, 16-bit (and 32-bit) data mapped onto 0..255, a PALETTE COLOR image through its colour
table, one frame chosen from a multi-frame file. A 16-bit or 32-bit grey PNG or TIFF (PadChest's
PNGs, most research exports of X-rays) is mapped from its own lowest to highest value onto 0..255,
as a DICOM without a window: Pillow's own conversion would clip everything above 255 to white.
A PNG with transparency (a journal figure, as in PMC-VQA) is laid on white, the page it was drawn
for: Pillow's conversion to RGB drops the alpha and shows what lies under it, black for most
figures. A photograph (JPEG, TIFF) is turned the way its EXIF orientation says, as a viewer shows it.
Training, evaluation, inference and ``check-data`` all call :func:`load_image`, so a file is read
the same way everywhere; the encoder's own ``preprocess`` does the rest (size, normalisation).
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medvlm.config import DicomConfig

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# Pillow's grey modes wider than 8 bits (16-bit PNG / TIFF, 32-bit integer and float TIFF)
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def is_dicom(path: Path) -> bool:
    """A ``.dcm``-style name, or the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def load_image(path: str | Path, dicom: DicomConfig | None = None) -> Image.Image:
    """Open and fully decode an image; raises ValueError naming the file and what to do."""
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as err:      # a name the file system cannot even look up (too long, say: a shifted column)
        raise ValueError(f"image {str(path)[:200]}{'…' if len(str(path)) > 200 else ''} cannot be looked up "
                         f"({err.strerror}): is the data file's image column the image's path?") from None
    if not found:
        raise ValueError(f"image {path} is a folder, not an image file" if path.is_dir() else
                         f"image {path} not found{_near_miss(path)}")
    if is_dicom(path):
        return Image.fromarray(dicom_to_uint8(path, dicom or DicomConfig()))
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with Image.open(path) as im:
                im.load()
                image = _upright(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image {path} cannot be decoded ({err})") from None
    except Image.DecompressionBombError as err:   # Pillow's guard against a file that decodes into gigabytes
        raise ValueError(f"image {path} is too large to decode ({err}): downsample it (a Med-VQA encoder reads "
                         "a few hundred pixels a side)") from None
    if said:    # Pillow's own words (a truncated EXIF block, a very large image) name no file: say which
        log.warning("image %s: %s; the picture was read", path,
                    "; ".join(dict.fromkeys(str(w.message).rstrip(".") for w in said)))
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"image {path}: pixel values are not finite (a float image with NaN or inf)")
        return Image.fromarray(_to_uint8(values, float(values.min()), float(values.max())))
    if image.has_transparency_data:               # alpha channel, or a palette / colour key with transparency
        page = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, image.convert("RGBA")).convert("RGB")
    return image


def _upright(image: Image.Image) -> Image.Image:
    """A copy turned the way the file's EXIF orientation says; as stored when that metadata cannot be
    read (the pixels decoded; Pillow's EXIF parser raises struct, type and value errors, and warns,
    on a corrupt block, and a broken tag must not make a readable picture a bad row)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - any failure here is the metadata's, not the picture's
        return image.copy()


def _near_miss(path: Path) -> str:
    """What the data file probably meant, for a path that does not exist: the same path with /
    for \\ (written on Windows), or a file whose name differs only in case (a folder copied from a
    Windows or macOS disk, where ``.JPG`` and ``.jpg`` are one name)."""
    if "\\" in str(path) and Path(str(path).replace("\\", "/")).is_file():
        return " (a Windows path: write its folders with / in the data file)"
    if any(f"{scheme}:/" in str(path) for scheme in ("http", "https", "s3", "gs", "ftp")):
        return " (a URL: nothing is downloaded here; fetch the images and write their local paths in the data file)"
    try:
        same = _names_by_case(str(path.parent), path.parent.stat().st_mtime_ns).get(path.name.lower())
    except OSError:        # no such folder, or not readable
        return ""
    return f" (the folder has {same!r}: names differ in case on this system; fix the data file or rename)" \
        if same else ""


@functools.lru_cache(maxsize=32)
def _names_by_case(folder: str, mtime_ns: int) -> dict[str, str]:
    """A folder's file names by their lower case (listed once per folder version, not once per row)."""
    return {p.name.lower(): p.name for p in Path(folder).iterdir()}


def _frame(path: Path, arr: np.ndarray, frames: int, choice: str) -> np.ndarray:
    if frames <= 1:
        return arr
    index = {"first": 0, "middle": frames // 2, "last": frames - 1}.get(choice)
    if index is None:
        index = int(choice)
        if index >= frames:
            raise ValueError(f"DICOM {path}: data.dicom.frame={choice} but the file has {frames} frames "
                             f"(0..{frames - 1})")
    return arr[index]


def dicom_to_uint8(path: Path, cfg: DicomConfig) -> np.ndarray:
    """(H, W) uint8 for grey images, (H, W, 3) uint8 for colour ones; ValueError naming the file for
    any file it cannot show. pydicom reads elements lazily, so a malformed one (an unknown VR, a length
    that does not fit, text where a number belongs) raises where it is first used, as whatever error its
    parser or numpy gives: each is this file's problem, said once, here."""
    try:
        return _dicom_to_uint8(path, cfg)
    except (ValueError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - see above: the parse of an untrusted file
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 160 else detail[:160] + "…"
        raise ValueError(f"DICOM {path} is malformed ({type(err).__name__}: {detail}): export it again, or check it "
                         "with a DICOM validator such as dciodvfy") from None


def _dicom_to_uint8(path: Path, cfg: DicomConfig) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ValueError(f"DICOM {path} cannot be read ({err})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError(f"DICOM {path} has no pixel data (a structured report or other non-image object?)")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        arr = ds.pixel_array   # colour (YBR) data comes back as RGB
    except Exception as err:  # pydicom raises RuntimeError/NotImplementedError/ValueError by handler
        name = getattr(syntax, "name", str(syntax))
        detail = " ".join(str(err).split())
        raise ValueError(f"DICOM {path}: pixel data in transfer syntax {name!r} ({syntax}) cannot be decoded "
                         f"here: {detail}. Install a decoder for it (e.g. `pip install pylibjpeg pylibjpeg-libjpeg "
                         f"pylibjpeg-openjpeg` or `pip install python-gdcm`), or export the images uncompressed."
                         ) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = _frame(path, arr, frames, cfg.frame)
    if int(ds.get("SamplesPerPixel", 1)) == 3:   # RGB: already display values
        return _to_uint8(arr.astype(np.float64), 0.0, float(2 ** int(ds.get("BitsStored", 8)) - 1))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":   # indices into a colour table
        try:
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            rgb = apply_color_lut(arr, ds)
        except (AttributeError, IndexError, KeyError, ValueError) as err:
            raise ValueError(f"DICOM {path}: PALETTE COLOR image whose colour table cannot be read ({err})") from None
        return _to_uint8(rgb.astype(np.float64), 0.0, float(2 ** bits - 1))

    values = apply_modality_lut(arr, ds).astype(np.float64)   # stored values -> e.g. Hounsfield units
    if not np.isfinite(values).all():
        raise ValueError(f"DICOM {path}: pixel values are not finite after RescaleSlope/Intercept")
    has_window = "WindowCenter" in ds or "VOILUTSequence" in ds
    if cfg.window_center is not None:
        lo, hi = cfg.window_center - cfg.window_width / 2, cfg.window_center + cfg.window_width / 2
        image = _to_uint8(np.clip(values, lo, hi), lo, hi)
    elif cfg.window == "percentile" or (cfg.window == "auto" and has_window and _full_range(ds)):
        lo, hi = (float(v) for v in np.percentile(values, cfg.percentiles))
        image = _to_uint8(np.clip(values, lo, hi), lo, hi)
    elif has_window:
        shown = apply_voi_lut(values, ds, index=0)
        # the window's output range, as pydicom maps it: apply it to values beyond both ends
        extremes = np.array([values.min() - 1e9, values.max() + 1e9])
        lo, hi = (float(v) for v in apply_voi_lut(extremes, ds, index=0))
        lo, hi = min(lo, hi), max(lo, hi)
        image = _to_uint8(np.clip(shown, lo, hi), lo, hi)
    else:
        image = _to_uint8(values, float(values.min()), float(values.max()))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":   # low values bright
        image = 255 - image
    return image


def _full_range(ds) -> bool:
    """True when the file's (first) window spans >= 90% of what its pixels can store: no real window."""
    try:
        width = float(np.atleast_1d(ds.WindowWidth)[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        return False   # a VOI LUT sequence: the file's own mapping
    slope = abs(float(ds.get("RescaleSlope", 1) or 1))
    return width >= 0.9 * slope * 2 ** int(ds.get("BitsStored", 16))


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:   # a constant image
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) / (hi - lo) * 255.0).clip(0, 255).astype(np.uint8)
