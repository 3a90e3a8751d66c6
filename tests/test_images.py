"""DICOM reading on pydicom's own test files (CT, MR, multi-frame, compressed) and on files we write."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medvlm.config import DicomConfig
from medvlm.data.images import load_image
from medvlm.data.synthetic import generate_hospital, write_dicom


def pydicom_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom ships {name}"
    return path


def grey(path, **kw) -> np.ndarray:
    return np.asarray(load_image(path, DicomConfig(**kw)))


def test_ct_rescale_then_forced_window():
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)   # Hounsfield units
    lo, hi = 40 - 400 / 2, 40 + 400 / 2
    want = np.round((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
    got = grey(pydicom_file("CT_small.dcm"), window_center=40, window_width=400)
    assert got.shape == (128, 128) and got.dtype == np.uint8
    assert np.array_equal(got, want)
    # without a window in the file or config: the full range of the image
    full = grey(pydicom_file("CT_small.dcm"))
    assert full.min() == 0 and full.max() == 255 and not np.array_equal(full, got)


def test_the_files_own_window_is_used(tmp_path):
    src = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    src.WindowCenter, src.WindowWidth = 40, 400
    src.save_as(tmp_path / "windowed.dcm")
    by_tag = grey(tmp_path / "windowed.dcm")
    by_config = grey(pydicom_file("CT_small.dcm"), window_center=40, window_width=400)
    assert np.abs(by_tag.astype(int) - by_config.astype(int)).max() <= 1   # DICOM's (c - 0.5, w - 1) rule


def test_16_bit_mr_fills_the_8_bit_range_and_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    assert ds.BitsAllocated == 16
    plain = grey(pydicom_file("MR_small.dcm"), window_center=600, window_width=1600)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inverted = grey(tmp_path / "mono1.dcm", window_center=600, window_width=1600)
    assert np.array_equal(inverted, 255 - plain)
    assert grey(pydicom_file("MR_small.dcm")).max() == 255


def test_multi_frame_choice():
    path = pydicom_file("rtdose.dcm")   # 15 frames of 10 x 10, 32-bit
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape[0] == 15
    third = grey(path, frame="3")
    scale = float(pydicom.dcmread(path).DoseGridScaling) if "DoseGridScaling" in pydicom.dcmread(path) else 1.0
    f = frames[3].astype(np.float64) * scale
    want = np.round((f - f.min()) / (f.max() - f.min()) * 255).astype(np.uint8)
    assert np.array_equal(third, want)
    assert not np.array_equal(grey(path, frame="first"), grey(path, frame="last"))
    assert np.array_equal(grey(path), grey(path, frame="7"))        # middle
    with pytest.raises(ValueError, match=r"rtdose.dcm.*frame=15.*15 frames"):
        grey(path, frame="15")


def test_compressed_syntax_without_a_decoder_names_file_syntax_and_fix():
    path = pydicom_file("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(ValueError) as info:
        load_image(path)
    text = str(info.value)
    assert "MR_small_jpeg_ls_lossless.dcm" in text and "JPEG-LS Lossless" in text and "pip install" in text


def test_compressed_syntaxes_with_a_decoder_read_like_the_uncompressed_file():
    rle = grey(pydicom_file("MR_small_RLE.dcm"))
    assert np.array_equal(rle, grey(pydicom_file("MR_small.dcm")))


def test_not_a_dicom_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(ValueError, match="scan.dcm"):
        load_image(bad)
    with pytest.raises(ValueError, match="nope.png not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="a URL: nothing is downloaded here"):      # an exported manifest's links
        load_image(tmp_path / "https://openi.nlm.nih.gov/imgs/512/1/1/CXR1_1_IM-0001-3001.png")
    (tmp_path / "series.png").mkdir()                           # a manifest naming a folder: said, not 'not found'
    with pytest.raises(ValueError, match="series.png is a folder, not an image file"):
        load_image(tmp_path / "series.png")


def test_synthetic_dicom_round_trips_to_the_same_picture(tmp_path):
    image = generate_hospital("general", 1, seed=0).images[0]
    write_dicom(image, tmp_path / "x.dcm")
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    assert ds.BitsStored == 12 and ds.RescaleIntercept == -1024
    assert np.array_equal(grey(tmp_path / "x.dcm"), image)
    # detected by its preamble even without the suffix
    (tmp_path / "x.dcm").rename(tmp_path / "IM0001")
    assert np.array_equal(grey(tmp_path / "IM0001"), image)


def test_config_rejects_half_a_window():
    with pytest.raises(ValueError, match="data.dicom.window_center/width"):
        DicomConfig(window_center=40)
    with pytest.raises(ValueError, match="data.dicom.frame"):
        DicomConfig(frame="centre")


# ----------------------------------------------------------------------------- real DICOM files (pydicom-data)
REAL_DICOM = ["RG1_UNCI.dcm",        # CR chest, MONOCHROME1, 15 bits, a full-range window
              "emri_small.dcm",      # enhanced MR, multi-frame
              "CT_small.dcm", "MR_small.dcm",
              "rtdose.dcm",          # RT dose, multi-frame
              "SC_rgb_jpeg_dcmtk.dcm"]  # JPEG baseline, YBR colour


@pytest.mark.parametrize("name", REAL_DICOM)
def test_real_dicom_files_become_pictures(name):
    from pydicom.data import get_testdata_file

    image = np.asarray(load_image(get_testdata_file(name)))
    assert image.dtype == np.uint8 and image.ndim in (2, 3) and image.std() > 5, name


def test_a_full_range_window_gets_the_robust_one_and_monochrome1_stays_inverted():
    from pydicom.data import get_testdata_file

    from medvlm.config import DicomConfig
    from medvlm.data.images import dicom_to_uint8

    path = Path(get_testdata_file("RG1_UNCI.dcm"))     # window 15000 / 30000 over 15-bit values
    own = dicom_to_uint8(path, DicomConfig(window="file"))
    auto = dicom_to_uint8(path, DicomConfig())
    robust = dicom_to_uint8(path, DicomConfig(window="percentile"))
    assert np.array_equal(auto, robust) and auto.std() > own.std() * 1.2        # more contrast
    assert np.percentile(auto, 1) < np.percentile(own, 1) - 20                   # the dark end is used
    # the same picture, the same way up: MONOCHROME1 inverted as with the file's window
    assert np.corrcoef(own.ravel().astype(float), auto.ravel().astype(float))[0, 1] > 0.9
    ct = dicom_to_uint8(Path(get_testdata_file("CT_small.dcm")), DicomConfig())
    assert np.array_equal(ct, dicom_to_uint8(Path(get_testdata_file("CT_small.dcm")), DicomConfig(window="file")))


def test_a_16_bit_png_or_tiff_is_read_over_its_own_range_not_clipped_to_white(tmp_path):
    from PIL import Image

    picture = generate_hospital("general", 1, seed=0).images[0]          # 8-bit grey
    stretched = np.round((picture - picture.min()) / np.ptp(picture) * 255).astype(np.uint8)
    stored = picture.astype(np.uint16) * 16 + 100                         # a 12-bit X-ray's values in 16 bits
    Image.fromarray(stored).save(tmp_path / "xray.png")
    assert Image.open(tmp_path / "xray.png").mode.startswith("I")
    read = load_image(tmp_path / "xray.png")
    assert read.mode == "L" and np.array_equal(np.asarray(read), stretched)
    assert (np.asarray(read.convert("RGB")) == 255).mean() < 0.05      # Pillow's own conversion: mostly white
    Image.fromarray(stored.astype(np.float32) / 4096).save(tmp_path / "xray.tiff")
    assert np.abs(grey(tmp_path / "xray.tiff").astype(int) - stretched).max() <= 1
    broken = stored.astype(np.float32)
    broken[3, 4] = np.nan
    Image.fromarray(broken).save(tmp_path / "nan.tiff")
    with pytest.raises(ValueError, match="nan.tiff: pixel values are not finite"):
        load_image(tmp_path / "nan.tiff")
    Image.fromarray(picture).save(tmp_path / "eight.png")                # 8-bit files are read as they are
    assert np.array_equal(grey(tmp_path / "eight.png"), picture)


def test_a_palette_colour_dicom_is_shown_through_its_colour_table_not_as_grey_indices(tmp_path):
    from pydicom.pixels import apply_color_lut

    path = pydicom_file("OBXXXX1A.dcm")          # PALETTE COLOR: 8-bit indices into 16-bit colour tables
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and ds.RedPaletteColorLookupTableDescriptor[2] == 16
    picture = load_image(path)
    expected = np.round(apply_color_lut(ds.pixel_array, ds) / 65535 * 255).astype(np.uint8)
    assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), expected)
    del ds.RedPaletteColorLookupTableData          # a table that cannot be read is named, not shown as grey
    ds.save_as(tmp_path / "broken.dcm")
    with pytest.raises(ValueError, match="broken.dcm: PALETTE COLOR image whose colour table cannot be read"):
        load_image(tmp_path / "broken.dcm")


def test_an_image_too_large_to_decode_is_named_with_what_to_do(tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "slide.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # 4,096 pixels: over twice the limit, as a huge slide
    with pytest.raises(ValueError, match="slide.png is too large to decode .*downsample it"):
        load_image(tmp_path / "slide.png")


def test_a_transparent_figure_is_laid_on_white_and_a_photograph_is_turned_by_its_exif_orientation(tmp_path):
    from PIL import Image, ImageOps

    figure = np.zeros((16, 24, 4), np.uint8)                 # a journal plot: black ink on a transparent page
    figure[4:6, 2:20, 3] = 255
    Image.fromarray(figure, "RGBA").save(tmp_path / "plot.png")
    assert np.asarray(Image.open(tmp_path / "plot.png").convert("RGB")).max() == 0   # Pillow alone: all black
    read = np.asarray(load_image(tmp_path / "plot.png"))
    assert read.shape == (16, 24, 3) and (read[4:6, 2:20] == 0).all()
    assert (read[:4] == 255).all() and (read[6:] == 255).all()
    half = figure.copy()
    half[..., :3], half[..., 3] = 200, 128                   # half-transparent grey over white: lighter grey
    Image.fromarray(half, "RGBA").save(tmp_path / "half.png")
    assert np.abs(np.asarray(load_image(tmp_path / "half.png")).astype(int) - 228).max() <= 1
    Image.fromarray(figure, "RGBA").convert("P").save(tmp_path / "palette.png", transparency=0)
    assert (np.asarray(load_image(tmp_path / "palette.png"))[:4] == 255).all()       # a palette's transparent index
    rgb = np.full((16, 24, 3), 90, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "opaque.png")        # an opaque picture is read as it is
    assert np.array_equal(np.asarray(load_image(tmp_path / "opaque.png")), rgb)

    photo = np.zeros((20, 30, 3), np.uint8)                  # landscape as stored, the bright corner top left
    photo[:5, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6                                         # Orientation 6: turn 90 degrees clockwise to view
    Image.fromarray(photo).save(tmp_path / "lesion.jpg", exif=exif, quality=100)
    upright = np.asarray(load_image(tmp_path / "lesion.jpg"))
    assert upright.shape == (30, 20, 3)                      # portrait, as the camera held it
    assert upright[:5, -5:].mean() > 200 and upright[:5, :5].mean() < 50   # the bright corner now top right
    exif[0x010F] = "Cam"                                     # Make, a text tag ...
    Image.fromarray(photo).save(tmp_path / "broken.jpg", exif=exif, quality=100)
    raw = bytearray((tmp_path / "broken.jpg").read_bytes())
    raw[raw.find(b"Exif") + 17] = 0x03                       # ... renumbered Compression: Pillow's EXIF writer fails
    (tmp_path / "broken.jpg").write_bytes(bytes(raw))
    with pytest.raises(Exception, match="required argument is not an integer"):
        ImageOps.exif_transpose(Image.open(tmp_path / "broken.jpg"))
    as_stored = np.asarray(load_image(tmp_path / "broken.jpg"))     # the picture, as stored: not a bad row
    assert as_stored.shape == (20, 30, 3) and as_stored[:5, :5].mean() > 200


def test_pillows_warning_about_a_file_is_logged_naming_that_file(tmp_path, caplog):
    """Pillow warns about a corrupt EXIF block as it opens a JPEG, in words that name no file (in a folder of
    thousands, nobody could find it): the warning is logged with the file's path, the picture read."""
    import struct

    from PIL import Image

    exif = Image.Exif()
    exif[0x010E] = "x" * 40                                  # ImageDescription, 41 bytes of text ...
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "clean.jpg", exif=exif)
    raw = bytearray((tmp_path / "clean.jpg").read_bytes())
    tiff = raw.find(b"Exif") + 6
    entry = tiff + raw[tiff:].find(b"\x01\x0e\x00\x02")     # big-endian tag 270, type ASCII
    struct.pack_into(">I", raw, entry + 4, 4000)             # ... said to be 4,000 bytes: past the file's end
    (tmp_path / "corrupt.jpg").write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        assert np.asarray(load_image(tmp_path / "clean.jpg")).shape == (8, 8, 3)
        assert not caplog.records                            # a sound file: not a word
        assert np.asarray(load_image(tmp_path / "corrupt.jpg")).shape == (8, 8, 3)
    assert len(caplog.records) == 1 and str(tmp_path / "corrupt.jpg") in caplog.text and "270" in caplog.text


def test_a_malformed_dicom_element_is_this_file_s_named_problem_whatever_pydicom_raises(tmp_path):
    """pydicom parses elements lazily: a bad one raises where first used, as NotImplementedError,
    TypeError, struct.error... Each must be a ValueError naming the file (a bad row), not a crash of
    check-data or of training."""
    write_dicom(np.zeros((8, 8), np.uint8), tmp_path / "good.dcm")
    raw = (tmp_path / "good.dcm").read_bytes()
    center = raw.find(b"\x28\x00\x50\x10DS\x06\x00-514.0")                 # (0028,1050) WindowCenter
    intercept = raw.find(b"\x28\x00\x52\x10DS")                             # (0028,1052) RescaleIntercept
    assert center > 0 and intercept > 0
    cases = {"vr.dcm": raw[:intercept + 4] + b"Q9" + raw[intercept + 6:],    # a VR no standard has
             "text.dcm": raw[:center + 8] + b"-5x4.0" + raw[center + 14:]}   # a window centre that is not a number
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"DICOM .*{name} is malformed .*export it again"):
            load_image(tmp_path / name)
    assert np.asarray(load_image(tmp_path / "good.dcm")).shape == (8, 8)
