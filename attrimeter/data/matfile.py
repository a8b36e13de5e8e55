"""Write MATLAB v5 ``.mat`` files laid out the way MATLAB itself writes them.

scipy's ``savemat`` stores an array in the class of its numpy dtype, so it can write MATLAB doubles only as 8-byte
floats. MATLAB stores integer-valued doubles compactly (class ``double``, data in the smallest integer type that
holds them), which is what the official Market-1501 / DukeMTMC-reID attribute files contain: ``loadmat`` returns
their vectors as ``uint8`` (``float64`` with ``mat_dtype=True``). This writer reproduces that layout, and MATLAB's
other choices (one zlib-compressed element per variable, struct field names padded to the longest name plus one,
char cells as UTF-8, elements of at most 4 bytes in the small-element form), so that a file written here and the
official one decompress to the same bytes for the same content. scipy reads the result; this module needs numpy only.

Supported values: ``dict`` (a 1x1 struct; field order kept), real numeric numpy arrays (stored as class
``double``; 1-D arrays become 1xN rows) and lists of ASCII strings (a 1xN cell of char rows).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_mat"]

# Data types (mi*, e.g. miINT8) and array classes (mx*_CLASS, e.g. mxCELL_CLASS) of the MAT-file v5 format.
_MI_INT8, _MI_UINT32, _MI_INT32, _MI_DOUBLE, _MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 1, 6, 5, 9, 14, 15, 16
_MX_CELL, _MX_STRUCT, _MX_CHAR, _MX_DOUBLE = 1, 2, 4, 6
# Compact storage of integer-valued doubles, smallest first (what MATLAB picks): (mi* data type, numpy dtype).
_COMPACT = ((2, "<u1"), (1, "<i1"), (4, "<u2"), (3, "<i2"), (6, "<u4"), (5, "<i4"))
_HEADER_TEXT = b"MATLAB 5.0 MAT-file, Platform: attrimeter, Created by: attrimeter.data.matfile"


def _element(mi_type: int, data: bytes) -> bytes:
    """One data element: the small form (tag and data in 8 bytes) for up to 4 bytes, else tag + data padded to 8."""
    if len(data) <= 4:
        return struct.pack("<I", mi_type | (len(data) << 16)) + data.ljust(4, b"\0")
    return struct.pack("<II", mi_type, len(data)) + data + b"\0" * (-len(data) % 8)


def _matrix(mx_class: int, dims: tuple[int, ...], body: bytes, name: str = "") -> bytes:
    """A miMATRIX element: array flags, dimensions, name, then the class-specific body."""
    content = (_element(_MI_UINT32, struct.pack("<II", mx_class, 0))
               + _element(_MI_INT32, struct.pack(f"<{len(dims)}i", *dims))
               + _element(_MI_INT8, name.encode("ascii")) + body)
    return struct.pack("<II", _MI_MATRIX, len(content)) + content


def _numeric(arr: np.ndarray) -> bytes:
    flat = np.asarray(arr, dtype=np.float64).ravel(order="F")  # MATLAB is column-major
    if flat.size and np.isfinite(flat).all() and (flat == np.round(flat)).all():
        for mi_type, dtype in _COMPACT:
            info = np.iinfo(dtype)
            if info.min <= flat.min() and flat.max() <= info.max:
                return _element(mi_type, flat.astype(dtype).tobytes())
    return _element(_MI_DOUBLE, flat.astype("<f8").tobytes())


def _encode(value: Any, where: str, name: str = "") -> bytes:
    """The miMATRIX element of one value (struct fields and cell entries are nameless, as in MATLAB's files)."""
    if isinstance(value, Mapping):
        names = [str(k) for k in value]
        if not all(n.isidentifier() and n.isascii() for n in names):
            raise ValueError(f"{where}: struct field names must be ASCII identifiers, got {names}")
        width = max((len(n) for n in names), default=0) + 1
        body = (_element(_MI_INT32, struct.pack("<i", width))
                + _element(_MI_INT8, b"".join(n.encode("ascii").ljust(width, b"\0") for n in names))
                + b"".join(_encode(v, f"{where}.{n}") for n, v in value.items()))
        return _matrix(_MX_STRUCT, (1, 1), body, name)
    if isinstance(value, (list, tuple)):
        if not all(isinstance(s, str) and s.isascii() for s in value):
            raise ValueError(f"{where}: a cell must hold ASCII strings")
        body = b"".join(_matrix(_MX_CHAR, (1, len(s)), _element(_MI_UTF8, s.encode("ascii"))) for s in value)
        return _matrix(_MX_CELL, (1, len(value)), body, name)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        dims = (1, value.size) if value.ndim <= 1 else value.shape
        return _matrix(_MX_DOUBLE, tuple(int(d) for d in dims), _numeric(value), name)
    raise TypeError(f"{where}: cannot write a {type(value).__name__} (supported: dict, real numpy array, "
                    "list of str)")


def write_mat(path: str | Path, name: str, value: Mapping[str, Any]) -> None:
    """Write one struct variable to a MATLAB v5 file, compressed, in MATLAB's own layout.

    Args:
        path: Output file (its parent folder must exist).
        name: Variable name, e.g. ``"market_attribute"``.
        value: The struct: field name to a nested ``dict``, a real numeric array or a list of ASCII strings.

    Raises:
        ValueError: For a name or field name that is not an ASCII identifier, or a non-ASCII string.
        TypeError: For a value of another type.
    """
    if not (name.isidentifier() and name.isascii()):
        raise ValueError(f"variable name must be an ASCII identifier, got {name!r}")
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: the variable must be a struct (a dict), got {type(value).__name__}")
    # Everything is encoded before the file is opened: an unsupported value leaves no half-written file behind.
    payload = zlib.compress(_encode(value, name, name))
    header = _HEADER_TEXT.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    # A compressed element is not padded (MATLAB's files end right after the zlib stream).
    Path(path).write_bytes(header + struct.pack("<II", _MI_COMPRESSED, len(payload)) + payload)
