"""The MATLAB v5 writer: scipy reads back what it writes, in MATLAB's class and storage choices."""

import numpy as np
import pytest
from mat_layout import mat_layout
from scipy.io import loadmat

from attrimeter.data.matfile import write_mat


def test_values_read_back_with_matlab_classes_and_compact_storage(tmp_path, rng):
    small = rng.integers(0, 256, 7).astype(np.float64)
    negative = np.append(rng.integers(-100, 100, 4), -1)
    wide = rng.integers(65536, 10**6, 3)
    fractional = rng.random((2, 3))
    value = {"a": small, "b": {"c": negative, "d": ["0002", "x"], "e": wide}, "f": fractional,
             "g": np.zeros(0), "h": []}
    path = tmp_path / "v.mat"
    write_mat(path, "v", value)

    back = loadmat(str(path), mat_dtype=True)["v"][0, 0]
    np.testing.assert_array_equal(back["a"], small[None, :])
    np.testing.assert_array_equal(back["b"][0, 0]["c"], negative[None, :])
    np.testing.assert_array_equal(back["b"][0, 0]["e"], wide[None, :])
    np.testing.assert_array_equal(back["f"], fractional)  # 2-D arrays keep their shape (column-major on disk)
    assert [str(x[0]) for x in back["b"][0, 0]["d"][0]] == ["0002", "x"]
    assert back["a"].dtype == np.float64 and back["g"].shape == (1, 0) and back["h"].shape == (1, 0)
    assert back.dtype.names == ("a", "b", "f", "g", "h")  # field order kept

    storage = {f["name"]: f.get("storage") for f in mat_layout(path)["variables"][0]["fields"]}
    assert storage["a"] == ["miUINT8"] and storage["f"] == ["miDOUBLE"]  # integer-valued doubles stored compactly
    inner = {f["name"]: f for f in mat_layout(path)["variables"][0]["fields"][1]["fields"]}
    assert inner["c"]["storage"] == ["miINT8"] and inner["e"]["storage"] == ["miUINT32"]
    assert all(f["class"] == "double" for f in inner.values() if f["name"] != "d")
    assert inner["d"]["class"] == "cell" and {c["class"] for c in inner["d"]["cells"]} == {"char"}


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("1bad", {}, ValueError, "variable name"),
        ("v", np.zeros(3), TypeError, "must be a struct"),
        ("v", {"bad name": np.zeros(1)}, ValueError, "field names"),
        ("v", {"a": ["é"]}, ValueError, "v.a: a cell must hold ASCII strings"),
        ("v", {"a": {"b": object()}}, TypeError, "v.a.b: cannot write a object"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, name, value, error, match):
    with pytest.raises(error, match=match):
        write_mat(tmp_path / "v.mat", name, value)
    assert not (tmp_path / "v.mat").exists()
