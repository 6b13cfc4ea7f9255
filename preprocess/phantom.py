"""Synthetic chest phantoms written as real DICOM, in several encodings of one volume.

The volume (body, fat rim, two lungs, spine, one dense lesion in the right lung, air outside at
exactly -1000 HU) is defined in patient coordinates (LPS, mm), so tests know where every structure
is. Every form and option encodes the same HU values: a folder of single-frame files ("series"),
one ZIP of that folder ("zip"), or one Enhanced CT multi-frame file ("multiframe"); slice order,
patient position, rescale per slice and transfer syntax vary the bytes, never the volume.
The fake patient name/ID/birth date exist so tests can check that they never leak.

CLI, a study to try the service with (`python -m client classify OUT`, `python -m preprocess OUT`):
    python -m preprocess.phantom OUT [--form zip|series|multiframe] [--slices N] [--rows N] [--columns N] [--seed N]
writes OUT (a .zip, a folder of .dcm files, or one multi-frame .dcm) and prints its path; a bad
command line (slices x rows x columns over INPUT_LIMITS.max_voxels included: `voxels_problem`) or an
OUT that cannot be written exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from contract.arguments import integer
from settings import INPUT_LIMITS

FORMS = ("series", "zip", "multiframe")
ORDERS = ("ascending", "shuffled", "feet_first")
RESCALES = ("constant", "per_slice")
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
}
FAKE_PHI = {"PatientName": "Phantom^Jane^Q", "PatientID": "PHI-0123456789", "PatientBirthDate": "19510704"}
LESION_HU = 300
# per-slice (slope, intercept) cycle: each maps integer HU to integer stored values exactly
_PER_SLICE_RESCALE = ((1.0, -1024.0), (0.5, -1024.0), (1.0, 0.0), (0.25, -1000.0))


@dataclass(frozen=True)
class Geometry:
    """Where the phantom sits in patient space: voxel [s, i, j] is at origin + (j*ps, i*ps, s*ss)."""

    slices: int
    rows: int
    columns: int
    pixel_spacing: float
    slice_spacing: float

    @property
    def origin(self) -> np.ndarray:
        return np.array(
            [
                -(self.columns - 1) / 2 * self.pixel_spacing,
                -(self.rows - 1) / 2 * self.pixel_spacing,
                -(self.slices - 1) / 2 * self.slice_spacing,
            ]
        )

    def to_patient(self, slice_index: float, row: float, column: float) -> np.ndarray:
        return self.origin + np.array([column * self.pixel_spacing, row * self.pixel_spacing, slice_index * self.slice_spacing])

    @property
    def lesion_center_mm(self) -> np.ndarray:
        """Centre of the lesion: right lung (negative x), slightly anterior, upper half of the stack."""
        half_x, half_y, half_z = (
            self.columns * self.pixel_spacing / 2,
            self.rows * self.pixel_spacing / 2,
            self.slices * self.slice_spacing / 2,
        )
        return np.array([-0.36 * half_x, -0.08 * half_y, 0.2 * half_z])

    @property
    def lesion_radius_mm(self) -> float:
        return 0.09 * self.columns * self.pixel_spacing / 2


def hu_volume(
    *,
    slices: int = 48,
    rows: int = 128,
    columns: int = 128,
    pixel_spacing: float = 2.5,
    slice_spacing: float = 4.0,
    seed: int = 0,
    scanner_air: bool = False,
    lesion: bool = True,
) -> np.ndarray:
    """The phantom in integer HU, int16 [slice (feet->head), row (anterior->posterior), column (right->left)].

    Air is exactly -1000 HU by default, so the crop box is the body. scanner_air=True makes it look
    like a scanner's image instead: noisy air inside the circular field of view, -2048 HU padding
    outside it; then, as on real scans, the crop box is the whole field of view. lesion=False leaves
    the lungs clear.
    """
    g = Geometry(slices, rows, columns, pixel_spacing, slice_spacing)
    half_x, half_y, half_z = columns * pixel_spacing / 2, rows * pixel_spacing / 2, slices * slice_spacing / 2
    y = (g.origin[1] + np.arange(rows) * pixel_spacing)[:, None]
    x = (g.origin[0] + np.arange(columns) * pixel_spacing)[None, :]
    body = (x / (0.82 * half_x)) ** 2 + (y / (0.62 * half_y)) ** 2
    spine = (x / (0.09 * half_x)) ** 2 + ((y - 0.45 * half_y) / (0.09 * half_x)) ** 2
    field_of_view = x**2 + y**2 <= min(half_x, half_y) ** 2
    c = g.lesion_center_mm
    rng = np.random.default_rng(seed)
    volume = np.empty((slices, rows, columns), dtype=np.int16)
    for s in range(slices):  # slice by slice: bounded memory for benchmark-sized phantoms
        z = g.origin[2] + s * slice_spacing
        hu = np.full((rows, columns), -1000.0)
        hu[body <= 1.0] = -90.0  # subcutaneous fat
        hu[body <= 0.85] = 40.0  # soft tissue
        for side in (-1, 1):
            lung = (
                ((x - side * 0.38 * half_x) / (0.27 * half_x)) ** 2
                + ((y + 0.05 * half_y) / (0.42 * half_y)) ** 2
                + ((z - 0.1 * half_z) / (0.95 * half_z)) ** 2
            )
            hu[lung <= 1.0] = -850.0
        hu[spine <= 1.0] = 700.0
        if lesion:
            hu[(x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= g.lesion_radius_mm**2] = LESION_HU
        noise = rng.normal(0.0, 12.0, hu.shape)
        inside = field_of_view if scanner_air else hu > -1000.0
        hu[inside] += noise[inside]
        if scanner_air:
            hu[~field_of_view] = -2048.0
        volume[s] = np.round(hu)
    return volume


def study_files(
    form: str = "series",
    *,
    slices: int = 48,
    rows: int = 128,
    columns: int = 128,
    pixel_spacing: float = 2.5,
    slice_spacing: float = 4.0,
    seed: int = 0,
    order: str = "ascending",
    rescale: str = "constant",
    transfer_syntax: str = "explicit",
    extras: bool = False,
    scanner_air: bool = False,
    file_header: bool = True,
    lesion: bool = True,
) -> list[bytes]:
    """The phantom as a payload for preprocess_study / Triton: one element per file (or one ZIP).

    extras (zip form): adds a localizer, a thick (3x) reconstruction of the same volume, a text file
    and a fake thumbnail, all of which the series selection must skip.
    file_header=False: the images are bare data sets (implicit VR little endian, no preamble, no
    file meta), as older archives and some exports hold them. lesion=False: the same study with clear
    lungs (the same noise), so a test can tell where the lesion went.
    """
    if form not in FORMS or order not in ORDERS or rescale not in RESCALES or transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"form {FORMS}, order {ORDERS}, rescale {RESCALES}, transfer_syntax {tuple(TRANSFER_SYNTAXES)}")
    if not file_header and transfer_syntax not in ("explicit", "implicit"):
        raise ValueError("a bare data set (file_header=False) has no transfer syntax to declare compression in")
    geometry = Geometry(slices, rows, columns, pixel_spacing, slice_spacing)
    hu = hu_volume(
        slices=slices,
        rows=rows,
        columns=columns,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        seed=seed,
        scanner_air=scanner_air,
        lesion=lesion,
    )
    study_uid = generate_uid(entropy_srcs=["phantom study", str(seed)])
    series_uid = generate_uid(entropy_srcs=["phantom series", str(seed), str(slices), str(rows)])
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    if form == "multiframe":
        data = _enhanced_ct(hu, geometry, study_uid, series_uid, order, rescale, ts, seed)
        return [data if file_header else _bare(data)]
    members = _single_frames(hu, geometry, study_uid, series_uid, order, rescale, ts, seed, "CT", ("ORIGINAL", "PRIMARY", "AXIAL"))
    if not file_header:
        members = [(name, _bare(data)) for name, data in members]
    if form == "series":
        return [data for _, data in members]
    names = [(f"DICOM/ST0001/SE0001/{name}", data) for name, data in members]
    if extras:
        thick = hu[: slices - slices % 3].reshape(-1, 3, rows, columns).mean(axis=1).round().astype(np.int16)
        thick_geometry = Geometry(thick.shape[0], rows, columns, pixel_spacing, slice_spacing * 3)
        thick_uid = generate_uid(entropy_srcs=["phantom thick", str(seed)])
        thick_members = _single_frames(
            thick,
            thick_geometry,
            study_uid,
            thick_uid,
            "ascending",
            "constant",
            ExplicitVRLittleEndian,
            seed,
            "CT",
            ("DERIVED", "SECONDARY", "AXIAL"),
            z_shift=slice_spacing,
        )
        names += [(f"DICOM/ST0001/SE0003/{name}", data) for name, data in thick_members]
        names.append(("DICOM/ST0001/SE0002/IM0001", _localizer(hu, geometry, study_uid, seed)))
        names += [
            ("README.txt", b"Study exported by a CD burner. Open with any DICOM viewer.\n"),
            ("thumbs/preview.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
        ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data in names:
            archive.writestr(name, data)
    return [buffer.getvalue()]


def write_study(path: str | Path, form: str = "series", **options) -> Path:
    """Write study_files(form, **options) to disk: a folder of .dcm files, a .zip file, or one .dcm file."""
    path = Path(path)
    files = study_files(form, **options)
    if form == "series":
        path.mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(files, start=1):
            (path / f"IM{k:04d}.dcm").write_bytes(data)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[0])
    return path


def _base(study_uid: str, series_uid: str, sop_class: str, sop_uid: str, ts: str, modality: str, seed: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts != ImplicitVRLittleEndian else ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["phantom frame", str(seed)])
    ds.Modality = modality
    ds.Manufacturer = "ct-triage phantom"
    ds.StudyDate = "20200401"
    ds.SeriesDescription = "Chest phantom"
    for key, value in FAKE_PHI.items():
        setattr(ds, key, value)
    ds.PatientSex = "O"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    return ds


def _pixel_module(ds: Dataset, signed: bool) -> None:
    """Unsigned 12-bit stored values (the common CT encoding), or signed 16-bit for per-slice rescale."""
    ds.PixelRepresentation = 1 if signed else 0
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1


def _stored(hu_slice: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    stored = np.round((hu_slice.astype(np.float64) - intercept) / slope)
    return stored.astype(np.int16 if signed else np.uint16)


def _rescales(n: int, rescale: str) -> list[tuple[float, float]]:
    return [(_PER_SLICE_RESCALE[k % len(_PER_SLICE_RESCALE)] if rescale == "per_slice" else (1.0, -1024.0)) for k in range(n)]


def _plane(geometry: Geometry, s: int, feet_first: bool, z_shift: float = 0.0) -> tuple[list[float], list[float]]:
    """ImagePositionPatient and ImageOrientationPatient of slice s (feet-first mirrors the columns)."""
    if feet_first:
        corner = geometry.to_patient(s, 0, geometry.columns - 1)
        orientation = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    else:
        corner = geometry.to_patient(s, 0, 0)
        orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    corner = corner + np.array([0.0, 0.0, z_shift])
    return [round(float(v), 4) for v in corner], orientation


def _order(n: int, order: str, seed: int) -> list[int]:
    if order == "shuffled":
        return [int(k) for k in np.random.default_rng(seed + 1).permutation(n)]
    if order == "feet_first":
        return list(range(n - 1, -1, -1))
    return list(range(n))


def _encode(ds: Dataset, ts: str) -> bytes:
    if ts in (RLELossless, JPEG2000Lossless):
        ds.compress(ts)  # pydicom's RLE encoder / pylibjpeg-openjpeg, both lossless
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _bare(data: bytes) -> bytes:
    """The same object without preamble and file meta, in implicit VR little endian."""
    ds = dcmread(io.BytesIO(data))
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def _single_frames(hu, geometry, study_uid, series_uid, order, rescale, ts, seed, modality, image_type, z_shift=0.0):
    n, rows, columns = hu.shape
    feet_first = order == "feet_first"
    rescales = _rescales(n, rescale)
    signed = rescale == "per_slice" or bool((hu < -1024).any())
    members = []
    for number, s in enumerate(_order(n, order, seed), start=1):
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(s)])
        ds = _base(study_uid, series_uid, CTImageStorage, sop_uid, ts, modality, seed)
        ds.ImageType = list(image_type)
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.PatientPosition = "FFS" if feet_first else "HFS"
        position, orientation = _plane(geometry, s, feet_first, z_shift)
        ds.ImagePositionPatient = position
        ds.ImageOrientationPatient = orientation
        ds.SliceLocation = position[2]
        ds.PixelSpacing = [geometry.pixel_spacing, geometry.pixel_spacing]
        ds.SliceThickness = geometry.slice_spacing
        ds.Rows, ds.Columns = rows, columns
        slope, intercept = rescales[s]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        _pixel_module(ds, signed)
        image = hu[s][:, ::-1] if feet_first else hu[s]
        ds.PixelData = np.ascontiguousarray(_stored(image, slope, intercept, signed)).tobytes()
        members.append((f"IM{number:04d}", _encode(ds, ts)))
    return members


def _enhanced_ct(hu, geometry, study_uid, series_uid, order, rescale, ts, seed) -> bytes:
    n, rows, columns = hu.shape
    feet_first = order == "feet_first"
    rescales = _rescales(n, rescale)
    signed = rescale == "per_slice" or bool((hu < -1024).any())
    ds = _base(study_uid, series_uid, EnhancedCTImageStorage, generate_uid(entropy_srcs=[series_uid, "enhanced"]), ts, "CT", seed)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientPosition = "FFS" if feet_first else "HFS"
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = n
    _pixel_module(ds, signed)
    measures, orientation_item, frame_type = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [geometry.pixel_spacing, geometry.pixel_spacing]
    measures.SliceThickness = geometry.slice_spacing
    orientation_item.ImageOrientationPatient = _plane(geometry, 0, feet_first)[1]
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation_item])
    shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, pixels = [], []
    for number, s in enumerate(_order(n, order, seed), start=1):
        position, transform, content, group = Dataset(), Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = _plane(geometry, s, feet_first)[0]
        slope, intercept = rescales[s]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "HU"
        content.InStackPositionNumber = number
        group.PlanePositionSequence = DicomSequence([position])
        group.PixelValueTransformationSequence = DicomSequence([transform])
        group.FrameContentSequence = DicomSequence([content])
        per_frame.append(group)
        image = hu[s][:, ::-1] if feet_first else hu[s]
        pixels.append(_stored(image, slope, intercept, signed))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(np.stack(pixels)).tobytes()
    return _encode(ds, ts)


def _localizer(hu, geometry, study_uid, seed) -> bytes:
    """A coronal projection image flagged LOCALIZER, as scanners put in every study."""
    uid = generate_uid(entropy_srcs=["phantom localizer", str(seed)])
    ds = _base(study_uid, uid, CTImageStorage, generate_uid(entropy_srcs=[uid, "1"]), ExplicitVRLittleEndian, "CT", seed)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesNumber, ds.InstanceNumber = 2, 1
    projection = hu.mean(axis=1)[::-1]  # rows: head to feet, columns: right to left
    ds.Rows, ds.Columns = projection.shape
    ds.ImagePositionPatient = [round(float(v), 4) for v in geometry.to_patient(hu.shape[0] - 1, 0, 0)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.PixelSpacing = [geometry.slice_spacing, geometry.pixel_spacing]
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    signed = bool((projection < -1024).any())
    _pixel_module(ds, signed)
    ds.PixelData = _stored(projection, 1.0, -1024.0, signed).tobytes()
    return _encode(ds, ExplicitVRLittleEndian)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def voxels_problem(slices: int, rows: int, columns: int) -> str | None:
    """Why a phantom of this size is not made: over INPUT_LIMITS.max_voxels, preprocess would refuse it,
    and its volume is allocated whole (int16) before it is encoded. For command lines that make phantoms."""
    voxels = slices * rows * columns
    if voxels > INPUT_LIMITS.max_voxels:
        return f"{slices} x {rows} x {columns} = {voxels:,} voxels: at most {INPUT_LIMITS.max_voxels:,} (a study preprocess accepts)"
    return None


def _output_problem(out: Path, form: str) -> str | None:
    """What is wrong with OUT before any work."""
    if form == "series":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            return f"{out} exists and is not an empty folder: name a new folder for a series"
    elif out.is_dir():
        return f"{out} is a folder: name the file to write (a {form} study is one file)"
    blocking = next((parent for parent in out.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return f"{out}: {blocking} is a file, not a folder"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m preprocess.phantom",
        description="Write a synthetic chest phantom study as real DICOM (body, lungs, spine, one lesion; fake "
        "patient data), to try the service and the CLIs with. Prints the path written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="the study: a .zip (zip), a folder (series) or a .dcm file (multiframe)")
    parser.add_argument("--form", choices=FORMS, default="zip", help="zip, series (a folder of files) or multiframe (one file)")
    slices = integer(INPUT_LIMITS.min_slices, INPUT_LIMITS.max_slices)
    parser.add_argument("--slices", type=slices, default=48, metavar="N", help="slices, 4 mm apart")
    parser.add_argument(
        "--rows", type=integer(32, INPUT_LIMITS.max_rows), default=128, metavar="N", help="rows per slice, pixels of 2.5 mm"
    )
    parser.add_argument(
        "--columns", type=integer(32, INPUT_LIMITS.max_columns), default=128, metavar="N", help="columns per slice, pixels of 2.5 mm"
    )
    parser.add_argument("--seed", type=integer(0, 2**32 - 1), default=0, metavar="N", help="noise and UIDs: another seed, another study")
    args = parser.parse_args(argv)
    problem = voxels_problem(args.slices, args.rows, args.columns) or _output_problem(args.out, args.form)
    if problem:
        parser.error(problem)
    try:
        written = write_study(args.out, args.form, slices=args.slices, rows=args.rows, columns=args.columns, seed=args.seed)
    except OSError as error:
        parser.error(f"cannot write {args.out}: {error.strerror or error}")
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
