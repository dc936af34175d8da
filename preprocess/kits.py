"""Reading, validating and writing KiTS19 case folders.

A KiTS19 case is ``case_XXXXX/imaging.nii.gz`` (CT in Hounsfield units) and
``case_XXXXX/segmentation.nii.gz`` (uint8: 0 background, 1 kidney, 2 tumor), both arrays of shape
(slices, H, W). Everything that touches those files goes through here, so that the synthetic
generator, the preprocessing scripts and inference agree on layout, affine and validation.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

CASE_RE = re.compile(r"^case_(\d{5})$")
IMAGING = "imaging.nii.gz"
SEGMENTATION = "segmentation.nii.gz"
LABELS = (0, 1, 2)
CLASS_NAMES = ("background", "kidney", "tumor")


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


def list_cases(kits_dir: str | Path, case_ids: Iterable[int] | None = None) -> list[int]:
    """Case ids present in ``kits_dir`` (folders named case_XXXXX), sorted.

    With ``case_ids``, every requested case must be present.
    """
    kits_dir = Path(kits_dir)
    if not kits_dir.is_dir():
        raise CaseError(f"{kits_dir}: not a directory (expected a KiTS19 folder of case_XXXXX)")
    present = sorted(
        int(m.group(1)) for p in kits_dir.iterdir() if p.is_dir() and (m := CASE_RE.match(p.name))
    )
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


@dataclass
class Case:
    """One loaded and validated case."""

    case_id: int
    # HU, (slices, H, W), in the file's own type (int16 for KiTS19) and nibabel's Fortran order
    imaging: np.ndarray
    segmentation: np.ndarray | None  # uint8 0/1/2, (slices, H, W); None for unlabeled input
    affine: np.ndarray
    spacing: tuple[float, float, float]
    # SHA-256 of the files read, by file name (provenance for the dataset manifest)
    sha256: dict[str, str] = field(default_factory=dict)


# The file is read, hashed and decompressed in chunks of this size, and the output goes straight
# into one array. Reading the whole file first and decompressing it in one zlib call kept the
# compressed file in memory beside the volume, and made zlib build its output in growing blocks
# joined into one bytes object at the end: every voxel written twice into fresh memory. Faulting
# in fresh pages is what two ranks on one machine slow each other down with: in bench.preprocess
# this took the 2-rank speed-up from 1.43x to 1.73x (same machine, back to back) and the peak
# memory of loading the largest case from 1.11 to 0.90 GB. 1 MiB is past where per-call
# overhead shows and stays in cache.
READ_CHUNK = 1 << 20
PART_BYTES = 4 << 20  # most decompressed bytes handed out at once
GZIP_MAGIC = b"\x1f\x8b"


class _Buffer:
    """A growable byte array: appends copy into place, no intermediate objects."""

    def __init__(self, capacity: int) -> None:
        self.array = np.empty(max(capacity, 1 << 16), np.uint8)
        self.size = 0

    def append(self, part: bytes) -> None:
        end = self.size + len(part)
        if end > len(self.array):
            grown = np.empty(max(2 * len(self.array), end), np.uint8)
            grown[: self.size] = self.array[: self.size]
            self.array = grown
        self.array[self.size : end] = np.frombuffer(part, np.uint8)
        self.size = end

    def view(self) -> memoryview:
        out = self.array[: self.size]
        out.flags.writeable = False  # callers get read-only voxels, as from a bytes object
        return memoryview(out)


def _size_hint(file: BinaryIO) -> int:
    """Bytes the file decompresses to: gzip's ISIZE (the last member's length mod 2**32, exact
    for the usual single member under 4 GiB), or the file's size. Leaves the position at 0."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    if file.read(2) != GZIP_MAGIC:
        hint = size
    elif size >= 18:
        file.seek(size - 4)
        hint = int.from_bytes(file.read(4), "little")
    else:
        hint = 0
    file.seek(0)
    return hint


def _inflate(stream: Any, data: bytes) -> Iterator[bytes]:
    """All the output of ``stream`` for ``data``, at most PART_BYTES at a time: a label map
    compresses about 200:1, and one unbounded call on 1 MiB of it would return 200 MB at once."""
    part = stream.decompress(data, PART_BYTES)
    while True:
        if part:
            yield part
        # a full part means zlib may hold more, in unconsumed_tail or its own state
        if stream.eof or len(part) < PART_BYTES:
            return
        part = stream.decompress(stream.unconsumed_tail, PART_BYTES)


def _decompressed_parts(file: BinaryIO, hasher: Any) -> Iterator[bytes]:
    """The bytes of ``file`` in pieces (gunzipped if it starts with the gzip magic), hashing the
    raw bytes; the whole file is read, so the hash is complete once the iterator is exhausted.

    Every gzip member is decompressed (zlib checks each one's CRC and length); zero padding after
    the last member is tolerated, as gzip does. Raises ValueError or zlib.error on bad input.
    """
    pending = file.read(READ_CHUNK)
    hasher.update(pending)
    if pending[:2] != GZIP_MAGIC:
        while pending:
            yield pending
            pending = file.read(READ_CHUNK)
            hasher.update(pending)
        return
    stream: Any = zlib.decompressobj(wbits=31)
    while True:
        if not pending:
            pending = file.read(READ_CHUNK)
            if not pending:
                break
            hasher.update(pending)
        if stream is None:  # between members: zero padding, or the next member
            if not pending.strip(b"\0"):
                pending = b""
                continue
            stream = zlib.decompressobj(wbits=31)
        yield from _inflate(stream, pending)
        pending = b""
        if stream.eof:
            pending, stream = stream.unused_data, None
    if stream is not None:
        raise ValueError("truncated gzip stream")


def read_decompressed(file: BinaryIO, hasher: Any) -> memoryview:
    """All bytes of ``file`` as one read-only buffer; see :func:`_decompressed_parts`."""
    buffer = _Buffer(_size_hint(file))
    for part in _decompressed_parts(file, hasher):
        buffer.append(part)
    return buffer.view()


@dataclass
class VolumeHeader:
    """What a NIfTI header says of its volume, as this module uses it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # bytes before the voxels
    slope: float | None
    inter: float | None
    affine: np.ndarray

    @property
    def scaled(self) -> bool:
        return self.slope is not None and (self.slope != 1 or (self.inter or 0) != 0)

    def to_values(self, voxels: np.ndarray) -> np.ndarray:
        """Stored voxels as the values they stand for: scaled storage comes back as float32
        ``voxels * slope + inter``, as nibabel gives it; anything else unchanged."""
        if not self.scaled:
            return voxels
        slope, inter = np.float32(self.slope), np.float32(self.inter or 0)
        return voxels.astype(np.float32) * slope + inter

    @property
    def n_bytes(self) -> int:
        return self.offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _parse_header(data: bytes | memoryview) -> VolumeHeader:
    """The header at the start of a decompressed NIfTI-1/2 file; ValueError if it is not one."""
    is_nifti2 = int.from_bytes(data[:4], "little") == 540 or bytes(data[:4]) == b"\0\0\x02\x1c"
    header_class = nib.Nifti2Header if is_nifti2 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(data[:4096]), check=True)
    if header["magic"] not in (b"n+1", b"n+2"):
        raise ValueError(f"magic {header['magic']!r} is not a single-file NIfTI")
    slope, inter = header.get_slope_inter()
    return VolumeHeader(
        shape=tuple(int(n) for n in header.get_data_shape()),
        dtype=np.dtype(header.get_data_dtype()),
        offset=int(header.get_data_offset()),
        slope=slope,
        inter=inter,
        affine=np.asarray(header.get_best_affine()),
    )


def _open_volume(path: Path, where: str) -> BinaryIO:
    """``path`` opened for reading, or :class:`CaseError` naming ``where`` if it is missing."""
    if not path.is_file():
        raise CaseError(f"{where}: missing file {path}")
    return path.open("rb")


def _read_error(where: str, path: Path, exc: Exception) -> CaseError:
    """The error for a file that could not be read (OSError) or is not a NIfTI volume."""
    if isinstance(exc, OSError):
        return CaseError(f"{where}: cannot read {path}: {exc}")
    return CaseError(f"{where}: cannot read {path} as NIfTI: {exc}")


def read_volume(path: Path, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Voxels, affine and SHA-256 of a NIfTI-1/2 file (.nii or .nii.gz), read in one pass.

    The voxels keep the file's own type and its Fortran order (read-only, no copy). Compared
    with ``nibabel.load(...).dataobj``, which gives the same array, this reads the file once for
    both the checksum and the voxels, in large chunks without the gzip module's Python-level
    read loop (a quarter of nibabel's load time on KiTS19 volumes), and holds no copy of the
    compressed file. Raises :class:`CaseError` naming ``where`` and the file.
    """
    hasher = hashlib.sha256()
    try:
        with _open_volume(path, where) as file:
            data = read_decompressed(file, hasher)
        header = _parse_header(data)
        if len(data) < header.n_bytes:
            raise ValueError(f"truncated: {len(data)} bytes, the header needs {header.n_bytes}")
        voxels = np.ndarray(
            header.shape, dtype=header.dtype, buffer=data, offset=header.offset, order="F"
        )
    except CaseError:
        raise
    except Exception as exc:  # OSError; zlib, nibabel and numpy raise several types
        raise _read_error(where, path, exc) from exc
    return header.to_values(voxels), header.affine, hasher.hexdigest()


class VolumeColumns:
    """A 3D NIfTI volume (S, H, W) read a group of columns at a time, never whole.

    NIfTI stores the first axis fastest, so ``W`` index ``w`` is one contiguous stretch of the
    file holding all slices and rows: ``columns`` of them make one chunk (S, H, columns),
    decompressed into a buffer that is reused for the next chunk. Memory is a few MB however
    large the volume; preprocessing resizes chunk by chunk instead of holding the whole CT (which
    two ranks on one machine spent their time faulting in, see ``READ_CHUNK``).

    Opening reads the header (``header``); iterating yields ``(first_column, chunk)`` with
    ``chunk`` valid until the next one; ``sha256`` is set once the iteration is complete.
    Raises :class:`CaseError` naming ``where`` and the file.
    """

    def __init__(self, path: Path, where: str, columns: int) -> None:
        self.path, self.where, self.columns = path, where, columns
        self.sha256: str | None = None
        self._hasher = hashlib.sha256()
        self._file = _open_volume(path, where)
        self._parts = _decompressed_parts(self._file, self._hasher)
        head = b""
        try:
            for part in self._parts:
                head += part
                if len(head) >= 4096:
                    break
            self.header = _parse_header(head)
        except Exception as exc:
            self.close()
            raise _read_error(where, path, exc) from exc
        self._rest = memoryview(head)[self.header.offset :]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> VolumeColumns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        shape, dtype = self.header.shape, self.header.dtype
        if len(shape) != 3:
            raise CaseError(f"{self.where}: {self.path} is {len(shape)}D, expected 3D")
        plane = shape[0] * shape[1] * dtype.itemsize  # bytes of one column w
        n_planes = min(self.columns, shape[2])
        buffer = np.empty(plane * n_planes, np.uint8)
        filled = column = 0
        total = plane * shape[2]
        try:
            parts = itertools.chain([self._rest], self._parts)
            for part in parts:
                view = memoryview(part)
                while len(view) and column * plane + filled < total:
                    take = min(len(view), len(buffer) - filled, total - column * plane - filled)
                    buffer[filled : filled + take] = np.frombuffer(view[:take], np.uint8)
                    filled += take
                    view = view[take:]
                    if filled == len(buffer) or column * plane + filled == total:
                        n = filled // plane
                        chunk = np.ndarray((*shape[:2], n), dtype, buffer, order="F")
                        yield column, chunk
                        column += n
                        filled = 0
                        remaining = shape[2] - column
                        if 0 < remaining < n_planes:
                            buffer = buffer[: plane * remaining]
            if column < shape[2]:
                got = self.header.offset + column * plane + filled
                raise ValueError(f"truncated: {got} bytes, the header needs {self.header.n_bytes}")
        except CaseError:
            raise
        except Exception as exc:  # zlib, numpy; OSError
            raise _read_error(self.where, self.path, exc) from exc
        finally:
            self.close()
        self.sha256 = self._hasher.hexdigest()


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
    """Load one case folder, validating files, shapes, labels and values.

    Raises :class:`CaseError` naming the case and what is wrong. Never modifies the input.
    """
    name = case_name(case_id)
    folder = Path(kits_dir) / name
    # The stored type, not float32: a float copy of a 600-slice CT is 630 MB and slow to make,
    # and integers cannot be NaN. Scaled or float files come back as floats and are checked.
    imaging, affine, imaging_sha = read_volume(folder / IMAGING, name)
    sha256 = {IMAGING: imaging_sha}
    if imaging.ndim != 3:
        raise CaseError(f"{name}: {folder / IMAGING} is {imaging.ndim}D, expected 3D")
    if imaging.dtype.kind not in "iuf" or imaging.dtype.fields is not None:
        raise CaseError(f"{name}: {folder / IMAGING} has voxel type {imaging.dtype}, not numeric")
    check_finite(imaging, f"{name}: {folder / IMAGING}")
    seg = None
    seg_path = folder / SEGMENTATION
    if require_segmentation or seg_path.exists():
        raw, _, sha256[SEGMENTATION] = read_volume(seg_path, name)
        if raw.shape != imaging.shape:
            raise CaseError(
                f"{name}: shape mismatch: imaging {imaging.shape} vs segmentation {raw.shape}"
            )
        if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
            raise CaseError(f"{name}: {seg_path} contains non-finite values")
        seg = validate_labels(raw, f"{name} ({seg_path})")
    return Case(
        case_id=case_id,
        imaging=imaging,
        segmentation=seg,
        affine=np.asarray(affine),
        spacing=spacing_from_affine(affine),
        sha256=sha256,
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
