"""PLUS / SlicerIGT tracked ultrasound sequences (``.igs.mha``, ``.igs.nrrd``, ``.seq.mha``, ...) <-> Sweep.

The format (facts from the PLUS toolkit's sequence file readers and writers):

* MetaImage (``.mha``): a text header of ``Key = Value`` lines ending with ``ElementDataFile = LOCAL``
  (pixels follow in the same file) or a file name. ``DimSize = W H N``, ``ElementType = MET_UCHAR``,
  ``ElementNumberOfChannels``, ``ElementSpacing`` (PLUS writes 1 1 1), ``CompressedData = True`` (a zlib
  stream of all frames), ``BinaryDataByteOrderMSB``, ``UltrasoundImageOrientation = MF``,
  ``UltrasoundImageType = BRIGHTNESS`` and per-frame fields ``Seq_Frame0000_<Name> = <value>``.
* NRRD (``.nrrd``): ``NRRD000x`` magic, ``field: value`` lines and ``key:=value`` lines (the per-frame
  ``Seq_Frame0000_<Name>:=...``, ``ultrasound image orientation:=MF``), ``sizes: W H N``,
  ``kinds: domain domain list`` (the frame axis has kind ``list`` or ``time``, anywhere), ``type``,
  ``encoding: raw|gzip``, ``endian``, ``space directions``; the header ends at the first empty line.

Geometry. ``<From>To<To>Transform`` is 16 numbers, row-major. ``ImageToReference`` maps PIXEL indices
(column c, row r, 0, 1) of the frame, oriented MF, to Reference millimetres; Slicer shows Reference as
RAS. The pixel (c, r) index is the pixel's centre (vtkImageData with origin 0 and spacing 1), so the
contract's image-mm origin (centre of pixel (0, 0)) is PLUS's image origin. Converting, with
F = diag(-1, -1, 1, 1) (RAS <-> LPS)::

    sx, sy = |column 0|, |column 1| of ImageToReference       (mm per pixel)
    tforms = F · ImageToReference · diag(1/sx, 1/sy, ·, 1)    with column 2 := column 0 × column 1

Column 2 of a PLUS matrix is not used for 2-D frames (PLUS files hold 0, a unit vector or a scaled
normal there); when it is the same multiple ``k`` of the image normal in every frame, ``k`` is kept in
``attrs['plus_image_z_scale_mm']`` so that writing back reproduces the matrices. Files whose
ElementSpacing / space directions are not 1 (written by tools that keep the pixel size out of the
matrix) are read with pixel -> Reference = ImageToReference · diag(ex, ey, 1, 1).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ultrasound_ai.core.atomic import atomic_output
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.geometry import LPS_TO_RAS
from ultrasound_ai.io.sweep import Sweep

__all__ = [
    "read_plus_sequence",
    "write_plus_sequence",
    "pixel_matrices_to_rigid",
    "frames_to_uint8",
]

_FRAME_RE = re.compile(r"^Seq_Frame(\d+)_(.+)$", re.IGNORECASE)
_MAX_HEADER_LINES = 10_000_000

_MET_TYPES = {
    "MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
    "MET_INT": "i4", "MET_ULONG": "u4", "MET_LONG": "i4", "MET_ULONG_LONG": "u8", "MET_LONG_LONG": "i8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}
_NRRD_TYPES = {}
for _names, _code in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
      "int64_t"), "i8"),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _n in _names:
        _NRRD_TYPES[_n] = _code


# ----------------------------------------------------------------------------------------------
# Shared conversions (also used by the TUS-REC importer)
# ----------------------------------------------------------------------------------------------


def frames_to_uint8(frames: np.ndarray, name: str) -> np.ndarray:
    """Frames as uint8. Rule: uint8 is kept; any other integer type is cast only when every value lies
    in [0, 255] (a lossless cast), else InputError; floating-point frames are refused (rescaling them
    would invent an intensity mapping the user did not choose)."""
    a = np.asarray(frames)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind not in "iu":
        raise InputError(f"{name}: frames must be 8-bit B-mode images (integers 0..255), got pixel type {a.dtype}")
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0 or hi > 255:
        raise InputError(
            f"{name}: {a.dtype} frames hold values {lo}..{hi}; expected 0..255 (8-bit B-mode); "
            "rescale them to 8 bits first"
        )
    return a.astype(np.uint8)


def pixel_matrices_to_rigid(M, name: str, max_shear: float = 1e-3, spacing_rtol: float = 1e-3):
    """Split pixel -> world matrices ``M [N, 4, 4]`` (columns 0 and 1 carry the pixel size) into rigid
    image-mm -> world transforms.

    Returns ``(T [N, 4, 4], (sx, sy), z_scale)``: sx, sy the column norms (the same in every frame within
    ``spacing_rtol``, else InputError), T with columns x̂, ŷ, x̂ × ŷ and M's translation, made exactly
    orthonormal (polar decomposition) once the in-plane axes are found perpendicular within
    ``max_shear`` (|cos| of their angle; else InputError: shear). ``z_scale`` is the common multiple k
    with column 2 = k·(x̂ × ŷ) in every frame, or None when column 2 is anything else.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 3 or M.shape[1:] != (4, 4):
        raise InputError(f"{name}: expected [N, 4, 4] matrices, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        i = int(np.argmax(~np.all(np.isfinite(M), axis=(1, 2))))
        raise InputError(f"{name}: frame {i}'s matrix contains NaN or infinite values")
    bad_bottom = np.abs(M[:, 3, :] - [0.0, 0.0, 0.0, 1.0]).max(axis=1) > 1e-6
    if np.any(bad_bottom):
        i = int(np.argmax(bad_bottom))
        raise InputError(f"{name}: frame {i}'s matrix must end with the row 0 0 0 1, got {M[i, 3].tolist()}")
    cx, cy = M[:, :3, 0], M[:, :3, 1]
    sx_i, sy_i = np.linalg.norm(cx, axis=1), np.linalg.norm(cy, axis=1)
    if np.any(sx_i <= 0) or np.any(sy_i <= 0):
        i = int(np.argmax((sx_i <= 0) | (sy_i <= 0)))
        raise InputError(f"{name}: frame {i}'s matrix has a zero pixel axis (column 0 or 1 is zero)")
    sx, sy = float(np.mean(sx_i)), float(np.mean(sy_i))
    spread = max(np.abs(sx_i / sx - 1).max(), np.abs(sy_i / sy - 1).max())
    if spread > spacing_rtol:
        raise InputError(
            f"{name}: the pixel size (norms of matrix columns 0 and 1) varies between frames by {spread:.3g} "
            f"(relative); expected one pixel spacing for the whole sequence"
        )
    x = cx / sx_i[:, None]
    y = cy / sy_i[:, None]
    cos = np.abs(np.einsum("ni,ni->n", x, y))
    if cos.max() > max_shear:
        i = int(np.argmax(cos))
        raise InputError(
            f"{name}: shear: frame {i}'s pixel axes are not perpendicular (|cos| = {cos[i]:.3g} > {max_shear:g}); "
            "expected a rotation times a pixel scaling"
        )
    z = np.cross(x, y)
    z /= np.linalg.norm(z, axis=1)[:, None]
    A = np.stack([x, y, z], axis=-1)
    u, _, vt = np.linalg.svd(A)
    R = u @ vt  # nearest rotation; det +1 because A is close to one (no reflection: z = x × y)
    T = np.zeros_like(M)
    T[:, :3, :3] = R
    T[:, :3, 3] = M[:, :3, 3]
    T[:, 3, 3] = 1.0
    c2 = M[:, :3, 2]
    k = np.einsum("ni,ni->n", c2, z)
    z_scale = None
    resid = np.linalg.norm(c2 - k[:, None] * z, axis=1)
    scale_ref = max(sx, sy)
    if np.all(resid <= 1e-6 * max(scale_ref, 1.0)) and np.ptp(k) <= 1e-6 * max(abs(float(np.mean(k))), scale_ref):
        z_scale = float(np.mean(k))
    return T, (sx, sy), z_scale


# ----------------------------------------------------------------------------------------------
# Header parsing
# ----------------------------------------------------------------------------------------------


class _Header:
    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind  # "mha" or "nrrd"
        self.fields: dict[str, str] = {}  # lower-case name -> value
        self.frames: dict[int, dict[str, str]] = {}  # frame -> lower-case field -> value
        self.data_offset = 0

    def get(self, name: str, default=None):
        return self.fields.get(name.lower(), default)

    def err(self, field: str, what: str) -> InputError:
        return InputError(f"{self.path}: '{field}': {what}")

    def add(self, name: str, value: str):
        name, value = name.strip(), value.strip()
        m = _FRAME_RE.match(name)
        if m:
            self.frames.setdefault(int(m.group(1)), {})[m.group(2).lower()] = value
        else:
            self.fields[name.lower()] = value


def _read_header(path: Path) -> _Header:
    with open(path, "rb") as fh:
        magic = fh.read(8)
        fh.seek(0)
        kind = "nrrd" if magic.startswith(b"NRRD") else "mha"
        hdr = _Header(path, kind)
        for _ in range(_MAX_HEADER_LINES):
            raw = fh.readline()
            if not raw:
                if kind == "nrrd":
                    hdr.data_offset = fh.tell()  # header only (detached data) without a final blank line
                    return hdr
                raise InputError(f"{path}: the MetaImage header has no 'ElementDataFile' line (not a sequence metafile?)")
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise InputError(f"{path}: binary data inside the header; expected text lines before the pixel data")
            if kind == "nrrd":
                if line == "":
                    hdr.data_offset = fh.tell()
                    return hdr
                if line.startswith("#") or line.startswith("NRRD"):
                    continue
                if ":=" in line:
                    k, v = line.split(":=", 1)
                elif ":" in line:
                    k, v = line.split(":", 1)
                else:
                    raise InputError(f"{path}: NRRD header line without ':' ({line[:80]!r})")
                hdr.add(k, v)
            else:
                if line.strip() == "":
                    continue
                if "=" not in line:
                    raise InputError(f"{path}: MetaImage header line without '=' ({line[:80]!r})")
                k, v = line.split("=", 1)
                hdr.add(k, v)
                if k.strip().lower() == "elementdatafile":
                    hdr.data_offset = fh.tell()
                    return hdr
    raise InputError(f"{path}: header too long")


def _numbers(hdr: _Header, field: str, value: str, count: int | None = None, frame: int | None = None) -> np.ndarray:
    where = field if frame is None else f"Seq_Frame{frame:04d}_{field}"
    try:
        vals = np.array([float(t) for t in value.replace(",", " ").split()], dtype=np.float64)
    except ValueError:
        raise hdr.err(where, f"expected numbers, got {value[:80]!r}") from None
    if count is not None and vals.size != count:
        raise hdr.err(where, f"expected {count} numbers, got {vals.size}")
    return vals


# ----------------------------------------------------------------------------------------------
# Pixel data
# ----------------------------------------------------------------------------------------------


def _layout(hdr: _Header):
    """(dtype, sizes in file order (fastest first), frame axis, channel axis or None, element spacing
    (ex, ey), image axes [x, y(, z)])."""
    if hdr.kind == "mha":
        et = hdr.get("ElementType")
        if et is None:
            raise hdr.err("ElementType", "missing (expected e.g. MET_UCHAR)")
        code = _MET_TYPES.get(et.strip().upper())
        if code is None:
            raise hdr.err("ElementType", f"unknown pixel type {et!r}; expected one of {sorted(_MET_TYPES)}")
        msb = (hdr.get("BinaryDataByteOrderMSB") or hdr.get("ElementByteOrderMSB") or "False").strip().lower() == "true"
        dtype = np.dtype(("<", ">")[msb] + code)
        dims = hdr.get("DimSize")
        if dims is None:
            raise hdr.err("DimSize", "missing (expected W H N)")
        sizes = [int(v) for v in _numbers(hdr, "DimSize", dims)]
        ch = int(_numbers(hdr, "ElementNumberOfChannels", hdr.get("ElementNumberOfChannels", "1"), 1)[0])
        if len(sizes) == 2:
            sizes = sizes + [1]
        if len(sizes) == 4 and sizes[2] == 1:  # W H 1 N (3-D frames of one slice)
            sizes = [sizes[0], sizes[1], sizes[3]]
        if len(sizes) != 3:
            raise hdr.err("DimSize", f"expected W H N (2-D frames), got {sizes}")
        sp = _numbers(hdr, "ElementSpacing", hdr.get("ElementSpacing", "1 1 1"))
        if sp.size < 2:
            raise hdr.err("ElementSpacing", "expected at least two numbers")
        if ch > 1:  # channels are interleaved: the fastest file axis
            return dtype, [ch] + sizes, 3, 0, (float(sp[0]), float(sp[1])), [1, 2]
        return dtype, sizes, 2, None, (float(sp[0]), float(sp[1])), [0, 1]
    # NRRD
    t = hdr.get("type")
    if t is None:
        raise hdr.err("type", "missing (expected e.g. uint8)")
    code = _NRRD_TYPES.get(" ".join(t.lower().split()))
    if code is None:
        raise hdr.err("type", f"unknown pixel type {t!r}")
    endian = (hdr.get("endian") or "little").strip().lower()
    dtype = np.dtype(("<" if endian == "little" else ">") + code)
    if hdr.get("sizes") is None:
        raise hdr.err("sizes", "missing")
    sizes = [int(v) for v in _numbers(hdr, "sizes", hdr.get("sizes"))]
    kinds = (hdr.get("kinds") or "").lower().split()
    if len(kinds) != len(sizes):
        raise hdr.err("kinds", f"expected one kind per axis of sizes {sizes} (e.g. 'domain domain list'), got {kinds}")
    frame_axes = [i for i, k in enumerate(kinds) if k in ("list", "time")]
    chan_axes = [i for i, k in enumerate(kinds) if k in ("vector", "rgb-color", "rgba-color", "3-color", "4-color")]
    dom_axes = [i for i, k in enumerate(kinds) if k in ("domain", "space")]
    if len(frame_axes) != 1:
        raise hdr.err("kinds", f"expected one frame axis of kind 'list' or 'time', got {kinds}")
    if len(chan_axes) > 1 or len(dom_axes) not in (2, 3) or len(dom_axes) + len(chan_axes) + 1 != len(sizes):
        raise hdr.err("kinds", f"expected two image axes, a frame axis and at most one channel axis, got {kinds}")
    if len(dom_axes) == 3:
        if sizes[dom_axes[2]] != 1:
            raise hdr.err("sizes", f"expected 2-D frames (third image axis of size 1), got {sizes}")
    spacing = (1.0, 1.0)
    sd = hdr.get("space directions")
    if sd is not None:
        vecs = re.findall(r"\(([^)]*)\)|none", sd)
        dirs = [v for v in vecs if v]
        if len(dirs) >= 2:
            d0 = _numbers(hdr, "space directions", dirs[0])
            d1 = _numbers(hdr, "space directions", dirs[1])
            if np.count_nonzero(d0[1:]) or np.count_nonzero(np.delete(d1, 1)) or d0[0] <= 0 or d1[1] <= 0:
                raise hdr.err("space directions", f"expected axis-aligned positive pixel directions, got {sd!r}")
            spacing = (float(d0[0]), float(d1[1]))
    return dtype, sizes, frame_axes[0], (chan_axes[0] if chan_axes else None), spacing, dom_axes


def _read_pixels(hdr: _Header, dtype: np.dtype, count: int) -> np.ndarray:
    path = hdr.path
    nbytes = count * dtype.itemsize
    if hdr.kind == "mha":
        datafile = hdr.get("ElementDataFile", "LOCAL")
        compressed = (hdr.get("CompressedData") or "False").strip().lower() == "true"
        encoding = "zlib" if compressed else "raw"
        field = "ElementDataFile"
    else:
        datafile = hdr.get("data file") or hdr.get("datafile") or "LOCAL"
        enc = (hdr.get("encoding") or "").strip().lower()
        if enc in ("gz", "gzip"):
            encoding = "zlib"
        elif enc == "raw":
            encoding = "raw"
        else:
            raise hdr.err("encoding", f"unsupported encoding {enc!r}; expected raw or gzip")
        field = "data file"
    if datafile.strip().upper() == "LOCAL":
        src, offset = path, hdr.data_offset
    else:
        src, offset = path.parent / datafile.strip(), 0
        if not src.is_file():
            raise hdr.err(field, f"pixel data file {src} not found")
    if hdr.kind == "nrrd" and hdr.get("byte skip") not in (None, "0"):
        raise hdr.err("byte skip", "only 'byte skip: 0' is supported")
    if encoding == "raw":
        avail = os.path.getsize(src) - offset
        if avail < nbytes:
            raise hdr.err(field, f"truncated pixel data: expected {nbytes} bytes, found {avail}")
        return np.fromfile(src, dtype=dtype, count=count, offset=offset)
    with open(src, "rb") as fh:
        fh.seek(offset)
        # wbits 47 = auto-detect a zlib (MetaImage) or gzip (NRRD) stream.
        d = zlib.decompressobj(47)
        chunks, got = [], 0
        try:
            while got < nbytes:
                buf = fh.read(1 << 22)
                if not buf:
                    break
                out = d.decompress(buf, nbytes - got)
                chunks.append(out)
                got += len(out)
                while d.unconsumed_tail and got < nbytes:
                    out = d.decompress(d.unconsumed_tail, nbytes - got)
                    chunks.append(out)
                    got += len(out)
        except zlib.error as exc:
            raise hdr.err(field, f"corrupt compressed pixel data ({exc})") from exc
    if got < nbytes:
        raise hdr.err(field, f"truncated compressed pixel data: expected {nbytes} bytes, decompressed {got}")
    return np.frombuffer(b"".join(chunks), dtype=dtype, count=count)


def _frames_from_file(hdr: _Header) -> tuple[np.ndarray, tuple[float, float]]:
    dtype, sizes, fax, cax, elem_sp, dom = _layout(hdr)
    count = int(np.prod(sizes))
    data = _read_pixels(hdr, dtype, count)
    arr = data.reshape(tuple(reversed(sizes)))  # first file axis varies fastest
    nd = len(sizes)
    rev = lambda i: nd - 1 - i  # noqa: E731 - file axis -> numpy axis
    order = [rev(fax)] + ([rev(dom[2])] if len(dom) == 3 else []) + [rev(dom[1]), rev(dom[0])]
    if cax is not None:
        order.append(rev(cax))
    arr = np.transpose(arr, order)
    if len(dom) == 3:
        arr = arr[:, 0]
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    if cax is not None:
        arr = _to_gray(arr, hdr)
    return arr, elem_sp


def _to_gray(arr: np.ndarray, hdr: _Header) -> np.ndarray:
    ch = arr.shape[-1]
    if ch not in (3, 4) or arr.dtype != np.uint8:
        raise hdr.err("ElementNumberOfChannels" if hdr.kind == "mha" else "kinds",
                      f"{ch}-channel {arr.dtype} pixels; expected grey (1 channel) or 8-bit RGB/RGBA")
    # Rule for colour screen captures: ITU-R BT.601 luma, rounded (alpha ignored).
    y = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _orient_to_mf(frames: np.ndarray, hdr: _Header) -> np.ndarray:
    key = "UltrasoundImageOrientation" if hdr.kind == "mha" else "ultrasound image orientation"
    o = (hdr.get(key) or "MF").strip().upper()
    if len(o) not in (2, 3) or o[0] not in "MU" or o[1] not in "FN":
        raise hdr.err(key, f"unsupported orientation {o!r}; expected MF, MN, UF or UN (B-mode)")
    # PLUS transforms refer to the frame oriented MF; flip the stored pixels as PLUS does on reading.
    if o[0] == "U":
        frames = frames[:, :, ::-1]
    if o[1] == "N":
        frames = frames[:, ::-1, :]
    return np.ascontiguousarray(frames)


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def _per_frame_matrix(hdr: _Header, n: int, name: str, required: bool):
    """[n, 4, 4] matrices and [n] OK flags of the per-frame field ``<name>Transform``; None if absent."""
    key = (name + "Transform").lower()
    present = [i for i in range(n) if key in hdr.frames.get(i, {})]
    if not present:
        if required:
            raise hdr.err(f"Seq_Frame0000_{name}Transform", "missing: no frame has this transform")
        return None
    extra = sorted(i for i, f in hdr.frames.items() if i >= n and key in f)
    if extra or len(present) != n:
        missing = [i for i in range(n) if i not in set(present)]
        raise hdr.err(
            f"{name}Transform",
            f"the file holds {n} frames (DimSize/sizes) but {len(present) + len(extra)} transforms "
            f"(frames without one: {missing[:5]}{'...' if len(missing) > 5 else ''}; beyond the last frame: {extra[:5]})",
        )
    M = np.empty((n, 4, 4))
    ok = np.ones(n, dtype=bool)
    for i in range(n):
        f = hdr.frames[i]
        M[i] = _numbers(hdr, f"{name}Transform", f[key], 16, frame=i).reshape(4, 4)
        status = f.get(key + "status", "OK").strip().upper()
        ok[i] = status == "OK"
    bad = ok & ~np.all(np.isfinite(M), axis=(1, 2))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise hdr.err(f"Seq_Frame{i:04d}_{name}Transform", "contains NaN or infinite values (status OK)")
    return M, ok


def read_plus_sequence(
    path: str | os.PathLike,
    image_to_probe=None,
    reference: str = "Reference",
    max_shear: float = 1e-3,
) -> Sweep:
    """Read a PLUS/Slicer tracked sequence metafile into a validated :class:`Sweep`.

    Poses come from the per-frame ``ImageTo<reference>Transform``; when the file has none, from
    ``ProbeTo<reference>Transform`` (else ``ProbeToTrackerTransform``) · ImageToProbe, where
    ImageToProbe (pixel -> probe mm, 4x4) is ``image_to_probe`` (array, or a text file of 16 numbers)
    or, absent that, the file's own per-frame ``ImageToProbeTransform``. Frames whose transform status
    (or image status) is not OK are dropped; ``attrs['plus_invalid_frames_dropped']`` counts them and
    ``attrs['plus_source_frame_index']`` gives each kept frame's index in the file. Timestamps come
    from ``Seq_FrameXXXX_Timestamp`` (seconds).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: PLUS sequence file not found")
    if not p.is_file():
        raise InputError(f"{p}: expected a sequence metafile (.igs.mha / .igs.nrrd), found a folder")
    hdr = _read_header(p)
    itype = hdr.get("UltrasoundImageType" if hdr.kind == "mha" else "ultrasound image type")
    if itype is not None and itype.strip().upper() not in ("BRIGHTNESS", "RGB_COLOR", "UNKNOWN"):
        raise hdr.err("UltrasoundImageType", f"{itype!r} frames are not B-mode images; expected BRIGHTNESS")
    frames, (ex, ey) = _frames_from_file(hdr)
    frames = _orient_to_mf(frames, hdr)
    n = frames.shape[0]

    direct = _per_frame_matrix(hdr, n, f"ImageTo{reference}", required=False)
    if direct is not None:
        M, ok = direct
        source = f"ImageTo{reference}"
    else:
        chain = _per_frame_matrix(hdr, n, f"ProbeTo{reference}", required=False)
        chain_name = f"ProbeTo{reference}"
        if chain is None:
            chain = _per_frame_matrix(hdr, n, "ProbeToTracker", required=False)
            chain_name = "ProbeToTracker"
        if chain is None:
            raise hdr.err(
                f"Seq_Frame0000_ImageTo{reference}Transform",
                f"missing transforms: expected ImageTo{reference}Transform, or ProbeTo{reference}Transform / "
                "ProbeToTrackerTransform with an ImageToProbe calibration",
            )
        P, ok = chain
        if image_to_probe is not None:
            c = _load_matrix(image_to_probe, "image_to_probe")
            M = P @ c
        else:
            own = _per_frame_matrix(hdr, n, "ImageToProbe", required=False)
            if own is None:
                raise InputError(
                    f"{p}: '{chain_name}Transform' needs an ImageToProbe calibration (pixel -> probe mm); pass "
                    "image_to_probe= (a 4x4 matrix) or use a file with ImageToProbeTransform / ImageToReferenceTransform"
                )
            M = P @ own[0]
            ok &= own[1]
        source = f"{chain_name}*ImageToProbe"
    for i in range(n):
        if hdr.frames.get(i, {}).get("imagestatus", "OK").strip().upper() != "OK":
            ok[i] = False
    if not np.any(ok):
        raise hdr.err(f"{source}TransformStatus", "no frame has a valid (OK) transform")
    keep = np.flatnonzero(ok)
    # Pixel -> Reference includes the file's element spacing (1 in files PLUS writes).
    M = M[keep] @ np.diag([ex, ey, 1.0, 1.0])
    T_ras, spacing, z_scale = pixel_matrices_to_rigid(M, f"{p}: {source}Transform", max_shear=max_shear)
    tforms = LPS_TO_RAS @ T_ras  # Reference RAS -> world LPS on the output side only
    timestamps = None
    ts_present = [i for i in keep if "timestamp" in hdr.frames.get(int(i), {})]
    if ts_present:
        if len(ts_present) != len(keep):
            missing = [int(i) for i in keep if "timestamp" not in hdr.frames.get(int(i), {})]
            raise hdr.err("Timestamp", f"frames {missing[:5]} have no Seq_FrameXXXX_Timestamp while others do")
        timestamps = np.array(
            [_numbers(hdr, "Timestamp", hdr.frames[int(i)]["timestamp"], 1, frame=int(i))[0] for i in keep]
        )
    frame_rate = hdr.get("UltrasoundAIFrameRateHz")
    attrs: dict[str, Any] = {
        "plus_invalid_frames_dropped": int(n - keep.size),
        "plus_source_frame_index": keep.astype(np.int64),
        "plus_transform": source,
    }
    if z_scale is not None:
        attrs["plus_image_z_scale_mm"] = float(z_scale)
    sweep = Sweep(
        frames=frames_to_uint8(frames[keep], f"{p}: pixel data"),
        pixel_spacing_xy=spacing,
        tforms=tforms,
        timestamps_s=timestamps,
        frame_rate_hz=None if frame_rate is None else float(_numbers(hdr, "UltrasoundAIFrameRateHz", frame_rate, 1)[0]),
        attrs=attrs,
    )
    return sweep.validate(name=str(p))


def _load_matrix(value, name: str) -> np.ndarray:
    if isinstance(value, (str, os.PathLike)):
        q = Path(value)
        if not q.is_file():
            raise InputError(f"{name}: calibration file {q} not found")
        try:
            value = [float(t) for t in q.read_text().replace(",", " ").split()]
        except ValueError:
            raise InputError(f"{name}: {q} must hold 16 numbers (a 4x4 matrix, row-major)") from None
    a = np.asarray(value, dtype=np.float64)
    if a.size != 16:
        raise InputError(f"{name}: expected a 4x4 matrix (16 numbers), got shape {a.shape}")
    a = a.reshape(4, 4)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name}: contains NaN or infinite values")
    return a


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    # Shortest repr that round-trips exactly; "-0.0" written as "0".
    x = float(x)
    return "0" if x == 0 else repr(x)


def _matrix_text(m: np.ndarray) -> str:
    return " ".join(_fmt(v) for v in m.reshape(-1))


def write_plus_sequence(
    sweep: Sweep,
    path: str | os.PathLike,
    tforms=None,
    compress: bool = False,
) -> Path:
    """Write ``sweep`` (frames + poses) as a PLUS sequence metafile that SlicerIGT's Volume
    Reconstruction opens: ``.mha`` (e.g. ``.igs.mha``) or ``.nrrd`` (``.igs.nrrd``), raw or compressed.

    ``tforms`` (image-mm -> world LPS, [N, 4, 4]; default ``sweep.tforms``, e.g. ESTIMATED poses) become
    ``ImageToReferenceTransform`` = RAS_FROM_LPS · T · diag(sx, sy, k, 1) with status OK, where k is
    ``attrs['plus_image_z_scale_mm']`` when present (from a PLUS file read earlier) else (sx + sy) / 2.
    Frames are written MF, BRIGHTNESS, uint8; timestamps from ``timestamps_s`` or i / frame_rate_hz.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".mha"):
        kind = "mha"
    elif name.endswith(".nrrd"):
        kind = "nrrd"
    else:
        raise InputError(f"{p}: expected a .mha (.igs.mha) or .nrrd (.igs.nrrd) file name for a PLUS sequence")
    if tforms is None:
        tforms = sweep.tforms
    if tforms is None:
        raise InputError(f"sweep for {p}: no 'tforms' to write (pass tforms= with the poses, image-mm -> world LPS)")
    s = dataclasses.replace(sweep, tforms=np.asarray(tforms, dtype=np.float64), attrs=dict(sweep.attrs))
    s.validate(name=f"sweep for {p}")
    n, h, w = s.frames.shape
    sx, sy = (float(v) for v in s.pixel_spacing_xy)
    k = s.attrs.get("plus_image_z_scale_mm")
    k = (sx + sy) / 2 if k is None else float(k)
    M = LPS_TO_RAS @ s.tforms @ np.diag([sx, sy, k, 1.0])
    if s.timestamps_s is not None:
        ts = s.timestamps_s
    elif s.frame_rate_hz is not None:
        ts = np.arange(n, dtype=np.float64) / s.frame_rate_hz
    else:
        ts = None

    per_frame = []
    for i in range(n):
        fields = [("FrameNumber", str(i)), ("ImageToReferenceTransform", _matrix_text(M[i])),
                  ("ImageToReferenceTransformStatus", "OK")]
        if ts is not None:
            fields.append(("Timestamp", _fmt(ts[i])))
        fields.append(("ImageStatus", "OK"))
        per_frame.append((i, fields))

    data = np.ascontiguousarray(s.frames).tobytes()  # C order [N, H, W]: column index fastest
    if compress:
        data = zlib.compress(data, 6) if kind == "mha" else gzip.compress(data, 6, mtime=0)

    lines: list[str] = []
    if kind == "mha":
        lines += [
            "ObjectType = Image", "NDims = 3", "AnatomicalOrientation = RAI", "BinaryData = True",
            "BinaryDataByteOrderMSB = False", "CenterOfRotation = 0 0 0",
            f"CompressedData = {'True' if compress else 'False'}",
        ]
        if compress:
            lines.append(f"CompressedDataSize = {len(data)}")
        lines += [
            f"DimSize = {w} {h} {n}", "ElementNumberOfChannels = 1", "ElementSpacing = 1 1 1",
            "ElementType = MET_UCHAR", "Kinds = domain domain list", "Offset = 0 0 0",
            "TransformMatrix = 1 0 0 0 1 0 0 0 1", "UltrasoundImageOrientation = MF",
            "UltrasoundImageType = BRIGHTNESS",
        ]
        if s.timestamps_s is None and s.frame_rate_hz is not None:
            lines.append(f"UltrasoundAIFrameRateHz = {_fmt(s.frame_rate_hz)}")
        for i, fields in per_frame:
            lines += [f"Seq_Frame{i:04d}_{k_} = {v}" for k_, v in fields]
        lines.append("ElementDataFile = LOCAL")
    else:
        lines += [
            "NRRD0004", "# Complete NRRD file format specification at:",
            "# http://teem.sourceforge.net/nrrd/format.html", "# Written by UltrasoundAI",
            "type: uint8", "dimension: 3", "space dimension: 2", f"sizes: {w} {h} {n}",
            "kinds: domain domain list", "endian: little", f"encoding: {'gzip' if compress else 'raw'}",
            "space origin: (0,0)", "space directions: (1,0) (0,1) none",
            "ultrasound image orientation:=MF", "ultrasound image type:=BRIGHTNESS",
        ]
        if s.timestamps_s is None and s.frame_rate_hz is not None:
            lines.append(f"UltrasoundAIFrameRateHz:={_fmt(s.frame_rate_hz)}")
        for i, fields in per_frame:
            lines += [f"Seq_Frame{i:04d}_{k_}:={v}" for k_, v in fields]
        lines.append("")  # the empty line that ends a NRRD header
    header = ("\n".join(lines) + "\n").encode("utf-8")
    with atomic_output(p) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(data)
    return p
