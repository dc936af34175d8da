"""Reading, validating and writing KiTS19 case folders.

A KiTS19 case is ``case_XXXXX/imaging.nii.gz`` (CT in Hounsfield units) and
``case_XXXXX/segmentation.nii.gz`` (uint8: 0 background, 1 kidney, 2 tumor). Folders may carry a
suffix after the id (``case_00000_s153``). Everything that touches those files goes through
here, so that the synthetic generator, the preprocessing scripts and inference agree on layout,
orientation, affine and validation. Volumes are read with nibabel and brought to the canonical
KiTS19 layout (array (slices, H, W), see :func:`kits_affine`) by ``preprocess.orientation``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocess.orientation import OrientationError, Reorientation, reorientation

CASE_RE = re.compile(r"^case_(\d{5})$")
# A case folder: the 5-digit id, optionally followed by "_anything" (e.g. a slice tag).
CASE_FOLDER_RE = re.compile(r"^case_(\d{5})(?:_.+)?$")
IMAGING = "imaging.nii.gz"
SEGMENTATION = "segmentation.nii.gz"
# The first two bytes of every gzip file.
GZIP_MAGIC = b"\x1f\x8b"
# Deflate expands its input at most about 1032-fold.
DEFLATE_MAX_RATIO = 1032
LABELS = (0, 1, 2)
CLASS_NAMES = ("background", "kidney", "tumor")
N_CLASSES = len(CLASS_NAMES)
# A segmentation's affine must match its imaging's (both in the canonical layout) within these:
# rotation/zoom entries within this fraction of the voxel spacing of their column, and the
# origin within this many mm. Affines written by one converter agree to float precision; a
# real misregistration (a shifted or rescaled label map) is millimetres or more.
AFFINE_MATCH_RELATIVE = 1e-3
AFFINE_MATCH_MM = 0.5


class CaseError(ValueError):
    """A case folder or file that cannot be used; the message names the case and the problem."""


def case_name(case_id: int) -> str:
    return f"case_{case_id:05d}"


def kits_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The KiTS19 affine for an array (z, y, x) with ``spacing = (sz, sy, sx)`` in mm.

    KiTS19 stores volumes with the slice axis first; its affines map array axis 0 to -z,
    axis 1 to -y and axis 2 to -x, which is what this reproduces.
    """
    sz, sy, sx = (float(s) for s in spacing)
    return np.array(
        [[0.0, 0.0, -sx, 0.0], [0.0, -sy, 0.0, 0.0], [-sz, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (along array axes 0, 1, 2) from an affine."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def case_folders(kits_dir: str | Path) -> dict[int, Path]:
    """Every case folder of ``kits_dir`` by case id (``case_XXXXX`` or ``case_XXXXX_<tag>``).

    Raises :class:`CaseError` if ``kits_dir`` is not a folder or two folders share an id.
    """
    kits_dir = Path(kits_dir)
    if not kits_dir.is_dir():
        raise CaseError(f"{kits_dir}: not a directory (expected a KiTS19 folder of case_XXXXX)")
    folders: dict[int, Path] = {}
    for path in sorted(kits_dir.iterdir()):
        match = CASE_FOLDER_RE.match(path.name)
        if not (match and path.is_dir()):
            continue
        case_id = int(match.group(1))
        if case_id in folders:
            raise CaseError(
                f"{kits_dir}: two folders for {case_name(case_id)}: "
                f"{folders[case_id].name} and {path.name}"
            )
        folders[case_id] = path
    return folders


def case_folder(kits_dir: str | Path, case_id: int) -> Path:
    """The folder of case ``case_id`` in ``kits_dir`` (``case_XXXXX`` or ``case_XXXXX_<tag>``).

    Raises :class:`CaseError` if there is none, or more than one for the id.
    """
    name = case_name(case_id)
    found = sorted(
        p for p in Path(kits_dir).glob(f"{name}*") if CASE_FOLDER_RE.match(p.name) and p.is_dir()
    )
    if not found:
        raise CaseError(f"{kits_dir}: no folder for {name}")
    if len(found) > 1:
        raise CaseError(f"{kits_dir}: two folders for {name}: {found[0].name} and {found[1].name}")
    return found[0]


def list_cases(kits_dir: str | Path, case_ids: Iterable[int] | None = None) -> list[int]:
    """Case ids present in ``kits_dir`` (see :func:`case_folders`), sorted.

    With ``case_ids``, every requested case must be present.
    """
    present = sorted(case_folders(kits_dir))
    if case_ids is None:
        if not present:
            raise CaseError(f"{kits_dir}: no case_XXXXX folders found")
        return present
    wanted = sorted(set(int(c) for c in case_ids))
    missing = [c for c in wanted if c not in set(present)]
    if missing:
        names = ", ".join(case_name(c) for c in missing[:10])
        raise CaseError(f"{kits_dir}: requested cases not found: {names}")
    return wanted


def parse_case_list(text: str) -> list[int]:
    """Parse '0-119,140-199,205' into a sorted list of ids."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"bad case range {part!r}")
            ids.update(range(lo, hi + 1))
        else:
            ids.add(int(part))
    return sorted(ids)


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _decompressed(data: bytes) -> bytes:
    """The content of gzip ``data``, decompressed in one call into one buffer.

    The gzip trailer holds the content's length (mod 2**32): zlib writes into a buffer of that
    size instead of growing one block by block and joining them, which would double the peak
    memory of a large CT. The size is capped at what deflate can expand ``data`` to, so a
    damaged trailer cannot ask for gigabytes. A file of several gzip members (as bgzip writes
    them) goes through the standard library's gzip.decompress, which reads them all.
    """
    size = int.from_bytes(data[-4:], "little")
    content = zlib.decompress(
        data, wbits=31, bufsize=max(1, min(size, DEFLATE_MAX_RATIO * len(data)))
    )
    if len(content) % 2**32 != size:
        return gzip.decompress(data)
    return content


def _nifti_voxels(content: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of the NIfTI-1/2 image in the bytes of a .nii file, read by nibabel.

    Unscaled voxels are a read-only view of ``content`` where nibabel's array proxy places them
    (offset, type, shape, order): nibabel's own read would copy every voxel once more into
    fresh memory, whose page faults make that copy slow on a large CT.
    """
    header = content[: nib.Nifti2Header.sizeof_hdr]
    klass = nib.Nifti2Image if nib.Nifti2Header.may_contain_header(header) else nib.Nifti1Image
    image = klass.from_bytes(content)
    proxy = image.dataobj
    if (proxy.slope, proxy.inter) == (1, 0):
        voxels = np.ndarray(
            proxy.shape, proxy.dtype, buffer=content, offset=proxy.offset, order=proxy.order
        )
    else:
        voxels = np.asarray(proxy)
    return voxels, np.asarray(image.affine, dtype=np.float64)


def read_volume(path: Path, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Voxels, affine and SHA-256 of a NIfTI-1/2 file (.nii or .nii.gz), read with nibabel.

    The file is read once: hashed, decompressed in one zlib call if gzipped (nibabel's
    streaming read takes 8 KiB at a time, see :func:`_decompressed`), parsed by nibabel. The
    voxels keep the file's stored type when it is unscaled (int16 for KiTS19: a float copy of a
    600-slice CT is 630 MB and slow to make) and are then read-only; scaled storage comes back
    as nibabel scales it (floats). The array is in the file's own layout, not reoriented.
    Raises :class:`CaseError` naming ``where`` and the file.
    """
    if not path.is_file():
        raise CaseError(f"{where}: missing file {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaseError(f"{where}: cannot read {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    try:
        content = _decompressed(data) if data[:2] == GZIP_MAGIC else data
        voxels, affine = _nifti_voxels(content)
    except Exception as exc:  # gzip, zlib and nibabel raise several types for bad files
        raise CaseError(f"{where}: cannot read {path} as NIfTI: {exc}") from exc
    return voxels, affine, digest


def canonical_volume(path: Path, where: str) -> tuple[np.ndarray, Reorientation, str]:
    """A volume (see :func:`read_volume`) brought to the canonical KiTS19 layout, with the
    :class:`Reorientation` that maps it back and the file's SHA-256. Non-3D or oblique volumes
    raise :class:`CaseError` naming ``where`` and the file."""
    voxels, affine, digest = read_volume(path, where)
    try:
        orient = reorientation(affine, voxels.shape, f"{where}: {path}")
    except OrientationError as exc:
        raise CaseError(str(exc)) from exc
    return orient.to_canonical(voxels), orient, digest


def check_same_grid(imaging: Reorientation, labels: Reorientation, where: str) -> None:
    """Raise :class:`CaseError` unless the two volumes lie on the same voxel grid in the world
    (same canonical shape; canonical affines within ``AFFINE_MATCH_RELATIVE`` and
    ``AFFINE_MATCH_MM``), naming ``where`` and how the affines differ."""
    if labels.canonical_shape != imaging.canonical_shape:
        raise CaseError(
            f"{where}: shape mismatch: imaging {imaging.canonical_shape} vs segmentation "
            f"{labels.canonical_shape} (canonical layout)"
        )
    a, b = imaging.canonical_affine, labels.canonical_affine
    spacing = np.asarray(imaging.canonical_spacing)
    linear = np.abs(a[:3, :3] - b[:3, :3]) / spacing  # per column, relative to its spacing
    shift = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
    if linear.max() > AFFINE_MATCH_RELATIVE or shift > AFFINE_MATCH_MM:
        raise CaseError(
            f"{where}: the segmentation's affine differs from the imaging's (origin shifted "
            f"{shift:.3g} mm, rotation/zoom by up to {linear.max():.3g} of a voxel; tolerance "
            f"{AFFINE_MATCH_MM} mm and {AFFINE_MATCH_RELATIVE}): imaging affine "
            f"{np.round(a, 4).tolist()}, segmentation affine {np.round(b, 4).tolist()}"
        )


@dataclass
class Case:
    """One loaded and validated case, in the canonical KiTS19 layout."""

    case_id: int
    # HU, (slices, H, W), in the file's own type (int16 for KiTS19); a read-only view of the
    # decompressed file (see read_volume)
    imaging: np.ndarray
    segmentation: np.ndarray | None  # uint8 0/1/2, (slices, H, W); None for unlabeled input
    affine: np.ndarray  # of the canonical arrays
    spacing: tuple[float, float, float]  # (slice, row, column) spacing in mm
    # the imaging file's own grid and the way back to it (prediction writes labels there)
    reorientation: Reorientation
    # SHA-256 of the files read, by file name (provenance for the dataset manifest)
    sha256: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None


def validate_labels(seg: np.ndarray, where: str) -> np.ndarray:
    """Check a label array holds only 0/1/2 and return it as uint8."""
    if seg.dtype.kind == "f":
        if not np.all(np.isfinite(seg)):
            raise CaseError(f"{where}: segmentation contains non-finite values")
        if np.any(seg != np.round(seg)):
            raise CaseError(f"{where}: segmentation has non-integer values")
    # min/max first: np.unique sorts the whole volume, far slower on 512x512x600 arrays
    if seg.size and (seg.min() < 0 or seg.max() > 2):
        bad = [v for v in np.unique(seg).tolist() if v not in LABELS]
        raise CaseError(f"{where}: labels outside {{0,1,2}}: {bad[:10]}")
    return seg.astype(np.uint8, copy=False)


def check_finite(values: np.ndarray, where: str) -> None:
    """Raise :class:`CaseError` if float ``values`` hold NaN or inf (integers cannot)."""
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise CaseError(f"{where} contains non-finite values (NaN or inf)")


def load_case(kits_dir: str | Path, case_id: int, require_segmentation: bool = True) -> Case:
    """Load one case folder in the canonical layout, validating files, orientation, shapes,
    affines, labels and values.

    Raises :class:`CaseError` naming the case and what is wrong. Never modifies the input.
    """
    name = case_name(case_id)
    folder = case_folder(kits_dir, case_id)
    imaging, orient, imaging_sha = canonical_volume(folder / IMAGING, name)
    sha256 = {IMAGING: imaging_sha}
    if imaging.dtype.kind not in "iuf" or imaging.dtype.fields is not None:
        raise CaseError(f"{name}: {folder / IMAGING} has voxel type {imaging.dtype}, not numeric")
    check_finite(imaging, f"{name}: {folder / IMAGING}")
    seg = None
    seg_path = folder / SEGMENTATION
    if require_segmentation or seg_path.exists():
        raw, seg_orient, sha256[SEGMENTATION] = canonical_volume(seg_path, name)
        check_same_grid(orient, seg_orient, name)
        seg = validate_labels(raw, f"{name} ({seg_path})")
    return Case(
        case_id=case_id,
        imaging=imaging,
        segmentation=seg,
        affine=orient.canonical_affine,
        spacing=orient.canonical_spacing,
        reorientation=orient,
        sha256=sha256,
        folder=folder,
    )


def atomic_path(final: Path) -> Path:
    """A temporary path beside ``final`` (same filesystem, so os.replace is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    # mkstemp makes 0600 files; outputs get the usual permissions (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path, header=None) -> None:
    """Write a NIfTI file via a temporary name and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        img = nib.Nifti1Image(array, affine, header=header)
        if header is None:
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
        # nibabel picks the format from the name: keep the .nii.gz suffix on the temp file
        gz_tmp = tmp.with_name(tmp.name + ".nii.gz")
        nib.save(img, str(gz_tmp))
        os.replace(gz_tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_case(
    out_dir: str | Path,
    case_id: int,
    imaging_hu: np.ndarray,
    segmentation: np.ndarray,
    spacing: tuple[float, float, float],
) -> Path:
    """Write a KiTS19-format case folder (int16 HU imaging, uint8 labels, KiTS19 affine)."""
    folder = Path(out_dir) / case_name(case_id)
    affine = kits_affine(spacing)
    img = np.clip(np.rint(imaging_hu), -1024, 3071).astype(np.int16)
    seg = validate_labels(np.asarray(segmentation), case_name(case_id)).astype(np.uint8)
    if img.shape != seg.shape:
        raise CaseError(f"{case_name(case_id)}: imaging {img.shape} vs segmentation {seg.shape}")
    save_nifti_atomic(seg, affine, folder / SEGMENTATION)
    save_nifti_atomic(img, affine, folder / IMAGING)
    return folder
