"""The layout of a MATLAB v5 file without its values, read straight from the bytes (independent of scipy).

Used to compare files written by attrimeter with the layouts of the official attribute files (class and storage type
of every array, struct field order, cells, compression), which scipy's ``loadmat`` partly hides.
"""

import struct
import zlib
from pathlib import Path
from typing import Any

MI_TYPES = {1: "miINT8", 2: "miUINT8", 3: "miINT16", 4: "miUINT16", 5: "miINT32", 6: "miUINT32", 7: "miSINGLE",
            9: "miDOUBLE", 12: "miINT64", 13: "miUINT64", 14: "miMATRIX", 15: "miCOMPRESSED", 16: "miUTF8",
            17: "miUTF16", 18: "miUTF32"}
MX_CLASSES = {1: "cell", 2: "struct", 4: "char", 6: "double", 7: "single", 8: "int8", 9: "uint8", 10: "int16",
              11: "uint16", 12: "int32", 13: "uint32", 14: "int64", 15: "uint64"}


def _elements(buf: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(buf):
        mi_type, size = struct.unpack_from("<II", buf, pos)
        if mi_type >> 16:  # small element: size in the upper half of the first word, data in the next 4 bytes
            size, mi_type = mi_type >> 16, mi_type & 0xFFFF
            out.append((mi_type, buf[pos + 4:pos + 4 + size]))
            pos += 8
        else:
            out.append((mi_type, buf[pos + 8:pos + 8 + size]))
            pos += 8 + size + (0 if mi_type == 15 else -size % 8)
    return out


def _matrix(data: bytes) -> dict[str, Any]:
    elements = _elements(data)
    (_, flags), (_, dims), (_, name), *rest = elements
    mx_class = MX_CLASSES[struct.unpack_from("<I", flags)[0] & 0xFF]
    node: dict[str, Any] = {"name": name.decode("ascii"), "class": mx_class,
                            "dims": list(struct.unpack(f"<{len(dims) // 4}i", dims))}
    if node["class"] == "struct":
        width = struct.unpack_from("<i", rest[0][1])[0]
        names = [rest[1][1][i:i + width].split(b"\0")[0].decode("ascii") for i in range(0, len(rest[1][1]), width)]
        node["field_name_width"] = width
        node["fields"] = [{**_matrix(d), "name": n} for n, (_, d) in zip(names, rest[2:], strict=True)]
    elif node["class"] == "cell":
        cells: list[dict[str, Any]] = []
        for _, d in rest:
            cell = _matrix(d)
            if cell not in cells:
                cells.append(cell)
        node["cells"] = cells  # the distinct layouts of the entries
    else:
        node["storage"] = [MI_TYPES[t] for t, _ in rest]
    return node


def mat_layout(path: str | Path) -> dict[str, Any]:
    """Header, top-level elements and the value-free tree of every variable of a MATLAB v5 file."""
    buf = Path(path).read_bytes()
    version, endian = struct.unpack_from("<H", buf, 124)[0], buf[126:128].decode("ascii")
    layout: dict[str, Any] = {"version": version, "endian": endian, "elements": [], "variables": []}
    for mi_type, data in _elements(buf[128:]):
        layout["elements"].append(MI_TYPES[mi_type])
        if mi_type == 15:
            (mi_type, data), = _elements(zlib.decompress(data))
        layout["variables"].append(_matrix(data))
    return layout


def mat_payload(path: str | Path) -> bytes:
    """The decompressed bytes of a file's single compressed variable (headers differ in their text; this does not)."""
    buf = Path(path).read_bytes()
    (mi_type, data), = _elements(buf[128:])
    assert mi_type == 15, f"{path}: the variable is not compressed"
    return zlib.decompress(data)
