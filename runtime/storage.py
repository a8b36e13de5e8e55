"""How a gallery stores its entries' attribute embeddings and maps: the codecs of format 3 (docs/architecture.md §10).

A gallery's identity records its storage (``"storage"`` in ``gallery.json``)::

    {"mode": "compact",
     "attr": {"kind": "pcaq", "shape": [M, C], "params": {...}},       codec documents (Codec.to_json)
     "aam": {"kind": "uint8", "shape": [M, h*w], "params": {}},         null when the gallery keeps no maps
     "arrays": {"attr.codes": ["|u1", [M, 62]], "attr.scales": ...},    each stored array: dtype, per-entry shape
     "codecs": {"sha256": "...", "size": 1234}}                          codecs.npz (trained state), or null

A segment holds one ``<stem>.npy`` per stored array. The stem of a float16 codec's array is the key itself
(``attr.npy``, ``aam.npy`` shaped ``[n, M, h, w]``: the files of formats 1 and 2, which are float16/float16), any
other codec's is ``<key>.<array>``. A trained codec's state is written once, as ``codecs.npz`` beside ``gallery.json``
when the gallery is created, and never rewritten: published codes are never re-encoded (a compaction copies them).

:class:`StorageCodecs` are the live codecs (what :meth:`Gallery.create` takes, :func:`fit_storage` makes);
:class:`Storage` is their description in the manifest, parsed strictly (:func:`parse_storage`), and
:func:`load_codecs` rebuilds the codecs from it and ``codecs.npz``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from attrimeter.runtime.codecs import STORAGE_MODES, Codec, codec_from_json, make_codec
from attrimeter.runtime.errors import CodecError, CorruptGalleryError, InputError

__all__ = ["DEFAULT_MODE", "FALLBACK_MODE", "FIT_MIN_ENTRIES", "STATE_NAME", "STORAGE_MODES", "Storage",
           "StorageCodecs", "check_codecs", "decode_rows", "default_mode", "describe", "encode_state", "fit_storage",
           "float16_storage", "load_codecs", "parse_storage", "storage_codecs"]

STATE_NAME = "codecs.npz"
# What ``attrimeter index`` stores by default: the smallest mode that keeps the shares within 1e-2 and the explanation
# metrics within 0.005 of float32 (benchmarks/results/storage_cpu.md).
DEFAULT_MODE = "compact"
# What ``attrimeter index`` stores when a new gallery has too few images to fit DEFAULT_MODE: untrained, 2x smaller.
FALLBACK_MODE = "int8"
# Fewest entries a trained codec is fitted on: fewer rows than the codec has axes would fit noise.
FIT_MIN_ENTRIES = 64
KEYS = ("attr", "aam")
_DTYPES = {np.dtype(d).str: np.dtype(d) for d in ("<f4", "<f2", "i1", "u1")}
_MODE = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_STEM = re.compile(r"(attr|aam)(\.[a-z0-9_]{1,40})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX = 1 << 62


class StorageCodecs(NamedTuple):
    """The codecs a gallery stores its rows with.

    Attributes:
        mode: The name recorded in the manifest (one of :data:`~attrimeter.runtime.codecs.STORAGE_MODES`, or the
            caller's name for codecs it made).
        attr: The attribute embeddings' codec, shape ``(M, C)``.
        aam: The attention maps' codec, shape ``(M, h·w)`` (kind ``none``: maps recomputed from the crop), or None
            for a gallery without maps.
    """

    mode: str
    attr: Codec
    aam: Codec | None

    def get(self, key: str) -> Codec | None:
        """The codec of ``"attr"`` or ``"aam"`` (None for the arrays stored as they are, and maps of no gallery)."""
        return {"attr": self.attr, "aam": self.aam}.get(key)

    @property
    def keeps_maps(self) -> bool:
        """Whether maps are stored (False: none, or recomputed from the crop)."""
        return self.aam is not None and self.aam.kind != "none"


@dataclass(frozen=True)
class Storage:
    """A gallery's storage as its manifest records it (compared by value: part of the gallery's identity).

    Attributes:
        mode: The mode's name.
        docs: ``(key, canonical JSON of the codec document)`` per key stored.
        arrays: ``(stem, dtype, per-entry shape)`` of every stored array file, in file order.
        state: ``(sha256, size)`` of ``codecs.npz``, or None when no codec is trained.
    """

    mode: str
    docs: tuple[tuple[str, str], ...]
    arrays: tuple[tuple[str, np.dtype, tuple[int, ...]], ...]
    state: tuple[str, int] | None

    def doc(self, key: str) -> dict[str, Any] | None:
        """The codec document of ``key``, or None."""
        return next((json.loads(d) for k, d in self.docs if k == key), None)

    @functools.cached_property  # read by every layout and append; the frozen fields do not change
    def stores_norms(self) -> bool:
        """Whether segments hold ``norms.npy``: with float16 rows, which scans read as they are stored.

        Decoded rows' norms are computed with the decoding (at ~no cost next to it), which saves their 4·M bytes
        per entry.
        """
        return self.doc("attr")["kind"] == "float16"

    def stems(self, key: str) -> list[str]:
        """The array stems of ``key`` (``attr`` or ``aam``)."""
        return [stem for stem, _, _ in self.arrays if stem.split(".")[0] == key]

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``"storage"`` field."""
        return {"mode": self.mode, "attr": self.doc("attr"), "aam": self.doc("aam"),
                "arrays": {stem: [dtype.str, list(shape)] for stem, dtype, shape in self.arrays},
                "codecs": None if self.state is None else {"sha256": self.state[0], "size": self.state[1]}}


def default_mode(images: int) -> str:
    """The mode a new gallery of ``images`` images is stored in when none is asked for (``attrimeter index``)."""
    return DEFAULT_MODE if images >= FIT_MIN_ENTRIES else FALLBACK_MODE


def storage_codecs(mode: str, dim: int, attributes: int, aam_shape: tuple[int, int] | None) -> StorageCodecs:
    """The (unfitted) codecs of a storage mode for a gallery's shapes.

    Args:
        mode: One of :data:`~attrimeter.runtime.codecs.STORAGE_MODES`.
        dim: Embedding width C.
        attributes: Number of attributes M.
        aam_shape: ``(h, w)`` of the maps, or None (then no map codec).

    Raises:
        InputError: An unknown mode.
    """
    if mode not in STORAGE_MODES:
        raise InputError(f"unknown storage mode {mode!r}; known: {', '.join(STORAGE_MODES)}")
    attr, aam = STORAGE_MODES[mode]
    maps = None if aam_shape is None else make_codec(aam["kind"], (attributes, aam_shape[0] * aam_shape[1]),
                                                     **_params(aam))
    return StorageCodecs(mode, make_codec(attr["kind"], (attributes, dim), **_params(attr)), maps)


def fit_storage(mode: str, attr_rows: np.ndarray, aam_rows: np.ndarray | None) -> StorageCodecs:
    """The codecs of a storage mode, trained kinds fitted on sample rows (not necessarily rows the gallery stores).

    Args:
        mode: One of :data:`~attrimeter.runtime.codecs.STORAGE_MODES`.
        attr_rows: Attribute embeddings ``[n, M, C]``.
        aam_rows: Attention maps ``[n, M, h, w]``, or None for a gallery without maps.

    Returns:
        The fitted codecs.

    Raises:
        InputError: An unknown mode, rows of the wrong shape or not finite, or fewer than :data:`FIT_MIN_ENTRIES`
            entries for a trained codec.
    """
    attr_rows = np.asarray(attr_rows)
    if attr_rows.ndim != 3:
        raise InputError(f"attr_rows must be [n, M, C], got shape {list(attr_rows.shape)}")
    if aam_rows is not None and (np.ndim(aam_rows) != 4 or len(aam_rows) != len(attr_rows)):
        raise InputError(f"aam_rows must be [n, M, h, w] like attr_rows' n, got shape {list(np.shape(aam_rows))}")
    aam_shape = None if aam_rows is None else tuple(np.shape(aam_rows)[2:])
    codecs = storage_codecs(mode, attr_rows.shape[2], attr_rows.shape[1], aam_shape)
    for codec, rows in ((codecs.attr, attr_rows), (codecs.aam, aam_rows)):
        if codec is None or not codec.trainable:
            continue
        if len(rows) < FIT_MIN_ENTRIES:
            raise InputError(f"storage mode {mode!r} fits a {codec.kind} codec on at least {FIT_MIN_ENTRIES} "
                             f"entries, got {len(rows)}")
        try:
            codec.fit(np.asarray(rows).reshape(len(rows), *codec.shape))
        except CodecError as e:
            raise InputError(f"storage mode {mode!r}: {e}") from e
    return codecs


def check_codecs(storage: str | StorageCodecs, dim: int, attributes: int,
                 aam_shape: tuple[int, int] | None) -> StorageCodecs:
    """The codecs a new gallery stores with: a mode of untrained codecs, or fitted codecs of the gallery's shapes.

    Raises:
        InputError: An unknown mode, codecs of other shapes, or a trained codec not fitted.
    """
    if isinstance(storage, str):
        codecs = storage_codecs(storage, dim, attributes, aam_shape)
    elif isinstance(storage, StorageCodecs):
        codecs = storage
    else:
        raise InputError(f"storage must be a mode name or StorageCodecs, got {type(storage).__name__}")
    maps = None if aam_shape is None else (attributes, aam_shape[0] * aam_shape[1])
    shapes = {"attr": (attributes, dim), "aam": maps}
    for key, shape in shapes.items():
        codec = codecs.get(key)
        if (codec is None) != (shape is None) or (codec is not None and codec.shape != shape):
            raise InputError(f"storage: the {key} codec must have shape {shape}, got "
                             f"{None if codec is None else codec.shape}")
        if codec is not None and not codec.fitted:
            raise InputError(f"storage mode {codecs.mode!r} trains a {codec.kind} codec: fit it first "
                             "(attrimeter.runtime.storage.fit_storage)")
    return codecs


def decode_rows(codec: Codec, stems: list[str], arrays: Mapping[str, Any], local: np.ndarray | None,
                block: tuple[int, int] | None = None) -> np.ndarray:
    """Decoded float32 rows ``[n, M, D]`` of one segment's stored arrays: at positions ``local``, or rows ``[a, b)``.

    Args:
        codec: The key's codec.
        stems: The key's array stems (:meth:`Storage.stems`), in the codec's layout order.
        arrays: The segment's arrays by stem (each with ``rows(local)`` and ``block(a, b)``).
        local: Segment-local positions, or None with ``block``.
        block: ``(a, b)``, read when ``local`` is None.
    """
    stored = {}
    for stem, (name, (_, shape)) in zip(stems, codec.layout().items(), strict=True):
        rows = arrays[stem].rows(local) if block is None else arrays[stem].block(*block)
        stored[name] = rows.reshape(len(rows), *shape)
    return codec.decode(stored)


def describe(codecs: StorageCodecs, aam_shape: tuple[int, int] | None, state: bytes | None) -> Storage:
    """The manifest's description of ``codecs`` (fitted), with the bytes of their ``codecs.npz`` (or None)."""
    docs, arrays = [], []
    for key in KEYS:
        codec = codecs.get(key)
        if codec is None:
            continue
        docs.append((key, _canonical(codec.to_json())))
        for name, (dtype, shape) in codec.layout().items():
            if codec.kind == "float16":  # the files of formats 1 and 2
                arrays.append((key, dtype, shape if key == "attr" else (shape[0], *aam_shape)))
            else:
                arrays.append((f"{key}.{name}", dtype, shape))
    digest = None if state is None else (hashlib.sha256(state).hexdigest(), len(state))
    return Storage(codecs.mode, tuple(docs), tuple(arrays), digest)


def encode_state(codecs: StorageCodecs) -> bytes | None:
    """``codecs.npz`` bytes: every trained codec's state as ``<key>.<array>``; None when no codec is trained."""
    arrays = {f"{key}.{name}": value for key in KEYS if (codec := codecs.get(key)) is not None
              for name, value in codec.state().items()}
    if not arrays:
        return None
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def float16_storage(dim: int, attributes: int, aam_shape: tuple[int, int] | None) -> Storage:
    """The storage of formats 1 and 2 (and of galleries created without a mode): float16 rows and maps."""
    return describe(storage_codecs("float16", dim, attributes, aam_shape), aam_shape, None)


def parse_storage(doc: Any, where: str, *, dim: int, attributes: int, aam_shape: tuple[int, int] | None) -> Storage:
    """Check the manifest's ``"storage"`` field against the gallery's shapes.

    Raises:
        CorruptGalleryError: Naming what is malformed.
    """
    def bad(what: str) -> CorruptGalleryError:
        return CorruptGalleryError(f"{where}: malformed storage ({what})")

    if not isinstance(doc, dict) or set(doc) != {"mode", "attr", "aam", "arrays", "codecs"}:
        raise bad("it holds exactly mode, attr, aam, arrays and codecs")
    if not isinstance(doc["mode"], str) or not _MODE.fullmatch(doc["mode"]):
        raise bad("mode must be a short lower-case name")
    docs = []
    for key, shape in (("attr", [attributes, dim]), ("aam", None if aam_shape is None else
                                                      [attributes, aam_shape[0] * aam_shape[1]])):
        codec = doc[key]
        if shape is None:
            if codec is not None:
                raise bad("aam must be null in a gallery without maps")
            continue
        if (not isinstance(codec, dict) or set(codec) != {"kind", "shape", "params"} or codec["shape"] != shape
                or not isinstance(codec["kind"], str) or not isinstance(codec["params"], dict)):
            raise bad(f"{key} must be a codec document of shape {shape}")
        try:
            docs.append((key, _canonical(codec)))
        except (TypeError, ValueError) as e:
            raise bad(f"{key}: {e}") from e
    if not isinstance(doc["arrays"], dict) or not doc["arrays"]:
        raise bad("arrays must be a non-empty mapping")
    arrays = []
    for stem, spec in doc["arrays"].items():
        if (not _STEM.fullmatch(stem) or not isinstance(spec, list) or len(spec) != 2 or spec[0] not in _DTYPES
                or not isinstance(spec[1], list)
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < _MAX for s in spec[1])):
            raise bad(f"array {stem!r} must be [dtype, per-entry shape]")
        if stem.split(".")[0] not in dict(docs):
            raise bad(f"array {stem!r} belongs to no codec")
        arrays.append((stem, _DTYPES[spec[0]], tuple(spec[1])))
    state = doc["codecs"]
    if state is not None and not (isinstance(state, dict) and set(state) == {"sha256", "size"}
                                  and isinstance(state["sha256"], str) and _SHA256.fullmatch(state["sha256"])
                                  and isinstance(state["size"], int) and not isinstance(state["size"], bool)
                                  and 0 < state["size"] < _MAX):
        raise bad("codecs must be null or {sha256, size}")
    return Storage(doc["mode"], tuple(docs), tuple(arrays), None if state is None else (state["sha256"], state["size"]))


def load_codecs(storage: Storage, state: bytes | None, *, aam_shape: tuple[int, int] | None, manifest: str,
                state_where: str) -> StorageCodecs:
    """Rebuild the codecs a manifest describes, from their documents and ``codecs.npz``.

    Args:
        storage: The parsed description.
        state: The bytes of ``codecs.npz`` (None when it is missing or the description lists none).
        aam_shape: The gallery's ``(h, w)``, or None.
        manifest: ``gallery.json``'s path, for messages.
        state_where: ``codecs.npz``'s path, for messages.

    Raises:
        CorruptGalleryError: ``codecs.npz`` missing, of another size or sha256, unreadable, or with state that does
            not fit the codecs (names ``codecs.npz``); codec documents or arrays that do not describe codecs (names
            ``gallery.json``).
    """
    arrays: dict[str, dict[str, np.ndarray]] = {key: {} for key in KEYS}
    if storage.state is not None:
        if state is None:
            raise CorruptGalleryError(f"{state_where}: missing (the manifest lists it)")
        if len(state) != storage.state[1] or hashlib.sha256(state).hexdigest() != storage.state[0]:
            raise CorruptGalleryError(f"{state_where}: does not match the manifest's size and sha256 (corrupt or "
                                      "modified)")
        try:
            with np.load(io.BytesIO(state), allow_pickle=False) as npz:
                for name in npz.files:
                    key, _, part = name.partition(".")
                    if key not in arrays or not part:
                        raise CorruptGalleryError(f"{state_where}: unexpected array {name!r}")
                    arrays[key][part] = npz[name]
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise CorruptGalleryError(f"{state_where}: not a codec state the store wrote ({type(e).__name__})") from e
    codecs: dict[str, Codec | None] = {}
    for key in KEYS:
        doc = storage.doc(key)
        if doc is None:
            codecs[key] = None
            continue
        trained = _trainable(doc)
        if trained and storage.state is None:
            raise CorruptGalleryError(f"{manifest}: malformed storage (the trained {key} codec has no codecs file)")
        try:
            codecs[key] = codec_from_json(doc, arrays[key] if trained else {})
        except CodecError as e:
            raise CorruptGalleryError(f"{state_where if trained else manifest}: the {key} codec cannot be rebuilt "
                                      f"({e})") from e
        if not trained and arrays[key]:
            raise CorruptGalleryError(f"{state_where}: holds state for the untrained {key} codec")
    out = StorageCodecs(storage.mode, codecs["attr"], codecs["aam"])
    if storage.state is not None and not any(c is not None and c.trainable for c in codecs.values()):
        raise CorruptGalleryError(f"{manifest}: malformed storage (a codecs file but no trained codec)")
    if describe(out, aam_shape, None).arrays != storage.arrays:
        raise CorruptGalleryError(f"{manifest}: malformed storage (its arrays are not the codecs' layout)")
    return out


def _trainable(doc: Mapping[str, Any]) -> bool:
    """Whether a codec document names a trained kind (its state lives in ``codecs.npz``)."""
    try:
        return make_codec(doc["kind"], tuple(doc["shape"]), **doc["params"]).trainable
    except (CodecError, TypeError):
        return False


def _params(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "kind"}


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
