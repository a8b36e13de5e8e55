import numpy as np
import pytest

from attrimeter.data.schema import (
    DUKEMTMC,
    MARKET1501,
    UNKNOWN,
    codes_from_labels,
    get_schema,
    known,
    labels_from_codes,
    list_schemas,
)

MARKET_NAMES = ("backpack bag clothes down downblack downblue downbrown downgray downgreen downpink downpurple "
                "downwhite downyellow gender hair handbag hat up upblack upblue upgray upgreen uppurple upred "
                "upwhite upyellow").split()
DUKE_NAMES = ("backpack bag boots downblack downblue downbrown downgray downgreen downred downwhite gender handbag "
              "hat shoes top upblack upblue upbrown upgray upgreen uppurple upred upwhite").split()


@pytest.mark.parametrize(("schema", "names"), [(MARKET1501, MARKET_NAMES), (DUKEMTMC, DUKE_NAMES)])
def test_schema_matches_design(schema, names):
    assert list(schema.names) == names  # docs/architecture.md §7, alphabetical
    assert sum(len(v) for v in schema.groups.values()) == len(schema)
    for a in schema:
        assert a.meanings[0] != a.meanings[1] and a.title and a.group


def test_market_colour_groups():
    groups = MARKET1501.groups
    assert len(groups["upper-body colour"]) == 8 and len(groups["lower-body colour"]) == 9
    assert MARKET1501["up"].describe(1) == "short sleeve" and MARKET1501["clothes"].describe(0) == "dress"


def test_encode_and_describe_roundtrip(rng):
    codes = {n: int(c) for n, c in zip(MARKET1501.names, rng.integers(1, 3, len(MARKET1501)), strict=True)}
    labels = MARKET1501.encode({**codes, "age": 3})  # extra keys such as age are ignored
    assert labels.dtype == np.int8 and list(labels) == [codes[n] - 1 for n in MARKET1501.names]
    described = MARKET1501.describe(labels)
    assert all(described[n] == MARKET1501[n].meanings[codes[n] - 1] for n in MARKET1501.names)
    labels[MARKET1501.index("hat")] = UNKNOWN
    assert MARKET1501.describe(labels)["hat"] == "unknown"


def test_codes_and_labels_convert_both_ways_with_unknown():
    codes = np.array([[1, 2, 0], [2, np.nan, 3]])
    labels = labels_from_codes(codes)
    assert labels.dtype == np.int8
    np.testing.assert_array_equal(labels, [[0, 1, UNKNOWN], [1, UNKNOWN, UNKNOWN]])
    np.testing.assert_array_equal(known(labels), [[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(codes_from_labels(labels), [[1, 2, 0], [2, 0, 0]])  # unknown is written as 0
    with pytest.raises(ValueError, match="0, 1 or -1"):
        codes_from_labels(np.array([2]))


def test_errors_name_the_problem():
    with pytest.raises(KeyError, match="'hat' missing"):
        MARKET1501.encode({n: 1 for n in MARKET1501.names if n != "hat"})
    with pytest.raises(ValueError, match="'bag' has code 3"):
        MARKET1501.encode({n: 3 if n == "bag" else 1 for n in MARKET1501.names})
    with pytest.raises(KeyError, match="no attribute 'boots'"):
        MARKET1501.index("boots")
    with pytest.raises(ValueError, match="26 attributes, got a vector of 23"):
        MARKET1501.describe(np.zeros(23))
    with pytest.raises(KeyError, match="unknown attribute schema 'cuhk03'"):
        get_schema("cuhk03")
    assert list_schemas() == ["dukemtmc", "market1501"]
