"""A prototype gallery store on the Lance columnar format, measured against ``runtime/gallery.py`` by bench_lance.py.

This is benchmark code, not a runtime store: the measurement it served (``benchmarks/results/lance_vs_store_cpu.md``)
decided against adopting Lance for now, so nothing in ``attrimeter.runtime`` imports it.

It holds what a gallery entry holds (docs/architecture.md §10) as one Lance row::

    embedding  fixed_size_list<float32>[C]          global embedding (searched)
    attr       fixed_size_list<float16>[M * C]      per-attribute embeddings (explained)
    probs      fixed_size_list<float32>[M]          predicted P(label 1)
    aam        fixed_size_list<float16>[M * h * w]  activation maps (only with ``aam_shape``)
    meta       string                               the entry's JSON metadata, without its id

A gallery id is the row's position: rows are only appended, never deleted, and Lance's compaction keeps their order,
so positions never change. Two writers may append at once (Lance commits optimistically and rebases appends), which
is why ids are only known once a commit is in: :meth:`LanceStore.append` reads them off the committed version.

What Lance does not do and this prototype adds, because the own store's tests require it:

* model identity: the gallery's identity fields (dim, attributes, aam_shape, model, metric) in the schema metadata,
  checked on open;
* durability: Lance's local writes call no ``fsync`` (seen with strace; pylance 14.0.2), so an append writes its
  fragments first (``write_fragments``), fsyncs them and their folder, then commits and fsyncs the new manifest;
* file checks: Lance keeps no content checksum (a flipped data byte reads back as a wrong value), so each data file
  gets a ``_attrimeter/files/<name>.json`` record (sha256 and size) before the commit that lists it, and each commit
  a ``_attrimeter/versions/<version>.json`` record (the manifest's sha256), so that a deleted newest manifest (Lance
  then silently opens the previous version) or an edited one is caught by :meth:`LanceStore.verify`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa
from lance.fragment import write_fragments

from attrimeter.runtime.errors import GalleryError, InputError, UnknownIdError

FORMAT = "attrimeter-lance-gallery"
_KEY = b"attrimeter"  # the schema metadata key of the identity
_OWN = "_attrimeter"  # our records beside Lance's folders
_DTYPES = {"embedding": np.dtype("<f4"), "attr": np.dtype("<f2"), "probs": np.dtype("<f4"), "aam": np.dtype("<f2")}
_ARROW = {"embedding": pa.float32(), "attr": pa.float16(), "probs": pa.float32(), "aam": pa.float16()}
_CHUNK = 1 << 20


class LanceStore:
    """A gallery on a Lance dataset: the same per-entry data, ids and read calls as ``Gallery``.

    Readers see the version they opened until :meth:`refresh`; any number of processes may append.
    """

    def __init__(self, path: Path, ds: lance.LanceDataset, header: dict[str, Any]):
        """Use :meth:`create` or :meth:`open`."""
        self.path = path
        self._ds = ds
        self.header = header
        self.dim: int = header["dim"]
        self.attributes: tuple[str, ...] = tuple(header["attributes"])
        self.aam_shape: tuple[int, int] | None = None if header["aam_shape"] is None else tuple(header["aam_shape"])
        self._count = ds.count_rows()

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str | Path, *, dim: int, attributes: Sequence[str], aam_shape: tuple[int, int] | None,
               model: str, metric: str = "l2") -> LanceStore:
        """Create an empty store in a new or empty folder.

        Args:
            path: The store folder.
            dim: Embedding width C.
            attributes: Attribute names (M of them).
            aam_shape: ``(h, w)`` of the stored maps, or ``None``.
            model: Identity of the embedding model (the export's source sha256).
            metric: ``"l2"`` or ``"ip"``.

        Returns:
            The store.

        Raises:
            GalleryError: The folder holds something already.
        """
        root = Path(path)
        if root.exists() and any(root.iterdir()):
            raise GalleryError(f"{root}: not empty; a gallery is created in a new folder")
        header = {"format": FORMAT, "version": 1, "dim": int(dim), "attributes": list(attributes),
                  "aam_shape": None if aam_shape is None else [int(s) for s in aam_shape], "model": model,
                  "metric": metric}
        schema = _schema(header)
        ds = lance.write_dataset(schema.empty_table(), str(root), schema=schema, mode="create")
        (root / _OWN / "files").mkdir(parents=True)
        (root / _OWN / "versions").mkdir()
        store = cls(root, ds, header)
        store._record_version(ds)
        return store

    @classmethod
    def open(cls, path: str | Path) -> LanceStore:
        """Open a store at its latest version, checking that it is one and reading its identity.

        Args:
            path: The store folder.

        Returns:
            The store.

        Raises:
            GalleryError: No store there, or a foreign or corrupt one.
        """
        root = Path(path)
        with _lance_errors(root):
            ds = lance.dataset(str(root))
            return cls(root, ds, _header_of(ds, root))

    # ------------------------------------------------------------------ writing

    def append(self, embedding: np.ndarray, attr_embeddings: np.ndarray, probs: np.ndarray,
               meta: Sequence[Mapping[str, Any]], aam: np.ndarray | None = None) -> np.ndarray:
        """Append entries durably as one commit; another process may be appending at the same time.

        Args:
            embedding: float [n, C].
            attr_embeddings: float [n, M, C] (stored float16).
            probs: float [n, M] in [0, 1].
            meta: One JSON-able mapping per entry, without ``"id"``.
            aam: float [n, M, h, w] (stored float16), exactly when the store has an ``aam_shape``.

        Returns:
            The new entries' ids, int64 [n] (consecutive: one commit's fragments are contiguous).

        Raises:
            InputError: Bad input; nothing is written.
        """
        table = self.to_table(embedding, attr_embeddings, probs, meta, aam)
        n = table.num_rows
        if n == 0:
            return np.zeros(0, np.int64)
        fragments = write_fragments(table, str(self.path), schema=self._ds.schema)
        names = [f.files[0].path for f in fragments]
        data = self.path / "data"
        for name in names:
            _fsync_file(data / name)
            _write_record(self.path / _OWN / "files" / f"{name}.json", _file_record(data / name))
        _fsync_dir(data)
        _fsync_dir(self.path / _OWN / "files")
        ds = self._commit(lance.LanceOperation.Append(fragments))
        self._record_version(ds)
        first = _first_row_of(ds, names[0])
        self._install(ds)
        return np.arange(first, first + n, dtype=np.int64)

    def _commit(self, operation: Any) -> lance.LanceDataset:
        """Commit on top of the version this handle reads; if another writer's compaction has cleaned that version
        up since, on top of the latest (appends commute, so any read version will do)."""
        read_version = self._ds.version
        for _ in range(3):
            try:
                return lance.LanceDataset.commit(str(self.path), operation, read_version=read_version)
            except OSError as e:
                if "was not found" not in str(e):
                    raise
                read_version = lance.dataset(str(self.path)).version
        raise GalleryError(f"{self.path}: could not commit an append (versions kept being cleaned up)")

    def compact(self) -> None:
        """Merge fragments (ids unchanged), record the new files, then delete files no version since needs."""
        ds = lance.dataset(str(self.path))
        ds.optimize.compact_files(target_rows_per_fragment=1 << 20)
        ds = lance.dataset(str(self.path))
        data = self.path / "data"
        for fragment in ds.get_fragments():
            for f in fragment.metadata.files:
                record = self.path / _OWN / "files" / f"{f.path}.json"
                if not record.exists():
                    _fsync_file(data / f.path)
                    _write_record(record, _file_record(data / f.path))
        _fsync_dir(data)
        self._record_version(ds)
        # Readers still on an old version re-open the latest when a file is gone (see _take).
        ds.cleanup_old_versions(retain_versions=1)
        listed = {f"{f.path}.json" for fr in ds.get_fragments() for f in fr.metadata.files}
        for record in (self.path / _OWN / "files").iterdir():
            if record.name not in listed:
                record.unlink()
        self._install(ds)

    def to_table(self, embedding: Any, attr: Any, probs: Any, meta: Any, aam: Any = None) -> pa.Table:
        """Check an append's input like ``Gallery.append`` does and build its Arrow table (what is written)."""
        if not isinstance(embedding, np.ndarray) or embedding.ndim != 2:
            raise InputError(f"embedding must be a 2-D numpy array [n, {self.dim}]")
        n, m = len(embedding), len(self.attributes)
        shapes = {"embedding": (n, self.dim), "attr": (n, m, self.dim), "probs": (n, m)}
        given = {"embedding": embedding, "attr": attr, "probs": probs}
        if (aam is None) != (self.aam_shape is None):
            raise InputError("aam is required exactly when the store has an aam_shape")
        if self.aam_shape is not None:
            shapes["aam"], given["aam"] = (n, m, *self.aam_shape), aam
        columns: dict[str, pa.Array] = {}
        for key, value in given.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.shape != shapes[key]:
                raise InputError(f"{key} must be a floating-point array of shape {list(shapes[key])}")
            with np.errstate(over="ignore"):
                out = np.ascontiguousarray(value, dtype=_DTYPES[key])
            if not np.isfinite(out).all():
                raise InputError(f"{key} holds NaN or infinite values (or overflows {out.dtype.name})")
            width = int(np.prod(shapes[key][1:]))
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1), _ARROW[key]), width)
        if ((given["probs"] < 0) | (given["probs"] > 1)).any():
            raise InputError("probs must lie in [0, 1]")
        if isinstance(meta, (str, bytes)) or not isinstance(meta, Sequence) or len(meta) != n:
            raise InputError(f"meta must be a sequence of {n} mappings")
        bodies = []
        for i, item in enumerate(meta):
            if not isinstance(item, Mapping) or "id" in item:
                raise InputError(f"meta[{i}] must be a mapping without 'id'")
            try:
                bodies.append(json.dumps(dict(item), allow_nan=False, separators=(",", ":")))
            except (TypeError, ValueError) as e:
                raise InputError(f"meta[{i}] is not JSON-serialisable: {e}") from e
        columns["meta"] = pa.array(bodies, pa.string())
        return pa.Table.from_pydict(columns, schema=self._ds.schema)

    def _record_version(self, ds: lance.LanceDataset) -> None:
        """Record the committed version's manifest sha256 (each version is committed by one writer only)."""
        manifest = _manifest_file(self.path, ds.version)
        _fsync_file(manifest)
        _fsync_dir(manifest.parent)
        _write_record(self.path / _OWN / "versions" / f"{ds.version}.json",
                      {"manifest": manifest.name, **_file_record(manifest)})
        _fsync_dir(self.path / _OWN / "versions")

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self._count

    @property
    def version(self) -> int:
        """The Lance version this handle reads."""
        return self._ds.version

    @property
    def fragments(self) -> int:
        """Number of fragments of that version (each append adds one; :meth:`compact` merges them)."""
        return len(self._ds.get_fragments())

    def refresh(self) -> int:
        """Move to the latest committed version; return the number of entries."""
        self._install(lance.dataset(str(self.path)))
        return self._count

    def _install(self, ds: lance.LanceDataset) -> None:
        if _header_of(ds, self.path) != self.header:
            raise GalleryError(f"{self.path}: now holds another gallery (identity changed); open it again")
        count = ds.count_rows()
        if count < self._count:
            raise GalleryError(f"{self.path}: shrank from {self._count} to {count} entries")
        self._ds, self._count = ds, count

    def rows(self, ids: Any, columns: Sequence[str] = ("embedding", "attr", "probs", "aam", "meta")) -> dict[str, Any]:
        """Several columns of the given entries in one take (what explaining a top-k reads).

        Args:
            ids: Gallery ids.
            columns: Stored column names.

        Returns:
            float32 arrays by column name (shaped like ``Gallery``'s reads), and ``"meta"``: dicts with their id.
        """
        idx = _as_ids(ids, self._count)
        table = self._take(idx, [c for c in columns if c != "aam" or self.aam_shape is not None])
        n, m = len(idx), len(self.attributes)
        shapes = {"embedding": (n, self.dim), "attr": (n, m, self.dim), "probs": (n, m)}
        if self.aam_shape is not None:
            shapes["aam"] = (n, m, *self.aam_shape)
        out: dict[str, Any] = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if name == "meta":
                out[name] = [{"id": int(i), **json.loads(s)} for i, s in zip(idx, column.to_pylist(), strict=True)]
            else:
                out[name] = column.flatten().to_numpy().reshape(shapes[name]).astype(np.float32)
        return out

    def _take(self, idx: np.ndarray, columns: list[str]) -> pa.Table:
        with _lance_errors(self.path):
            try:
                return self._ds.take(idx, columns=columns)
            except OSError as e:
                if "Not found" not in str(e):
                    raise
                self.refresh()  # a compaction deleted the files of the version this handle read: ids are unchanged
                return self._ds.take(idx, columns=columns)

    def embeddings(self, ids: Any) -> np.ndarray:
        """float32 [n, C]."""
        return self.rows(ids, ["embedding"])["embedding"]

    def attr_embeddings(self, ids: Any) -> np.ndarray:
        """float32 [n, M, C]."""
        return self.rows(ids, ["attr"])["attr"]

    def probs(self, ids: Any) -> np.ndarray:
        """float32 [n, M]."""
        return self.rows(ids, ["probs"])["probs"]

    def aam(self, ids: Any) -> np.ndarray | None:
        """float32 [n, M, h, w], or ``None`` without maps."""
        return self.rows(ids, ["aam"]).get("aam")

    def meta(self, ids: Any) -> list[dict[str, Any]]:
        """One dict per id, with its ``"id"``."""
        return self.rows(ids, ["meta"])["meta"]

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Lance's own exact k-nearest-neighbour search (a flat scan of the embedding column, no vector index).

        Args:
            query: float32 [C].
            k: Neighbours.

        Returns:
            ``(squared L2 distances float32 [k], ids int64 [k])``, best first.
        """
        table = self._ds.to_table(columns=["_distance"], with_row_address=True,
                                  nearest={"column": "embedding", "q": query, "k": k, "use_index": False})
        addr = table.column("_rowaddr").to_numpy()
        starts, first = {}, 0
        for fragment in self._ds.get_fragments():  # a row address is (fragment id << 32) | row within it
            starts[fragment.fragment_id] = first
            first += fragment.metadata.physical_rows
        ids = np.array([starts[int(a >> 32)] + int(a & 0xFFFFFFFF) for a in addr], np.int64)
        return table.column("_distance").to_numpy(), ids

    def scan_embeddings(self) -> np.ndarray:
        """All global embeddings in id order, float32 [N, C] (to build the search index)."""
        column = self._ds.to_table(columns=["embedding"]).column("embedding").combine_chunks()
        return column.flatten().to_numpy().reshape(-1, self.dim)

    def disk_bytes(self) -> int:
        """Bytes of every file under the folder (old versions not yet cleaned up included)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # ------------------------------------------------------------------ checking

    def verify(self) -> None:
        """Check what Lance does not: the newest recorded version is the one open, its manifest and data files match
        their sha256 records.

        Raises:
            GalleryError: A mismatch, naming the file.
        """
        versions = self.path / _OWN / "versions"
        recorded = max((int(p.stem) for p in versions.glob("*.json")), default=0)
        latest = lance.dataset(str(self.path))
        if latest.version < recorded:
            raise GalleryError(f"{self.path}: version {recorded} was committed but the newest manifest is version "
                               f"{latest.version} (a manifest was deleted: the newest appends are lost)")
        record = json.loads((versions / f"{latest.version}.json").read_text()) if (
            versions / f"{latest.version}.json").exists() else None
        manifest = _manifest_file(self.path, latest.version)
        if record is None or _file_record(manifest) != {k: record[k] for k in ("sha256", "size")}:
            raise GalleryError(f"{manifest}: does not match its record (edited, or committed without one)")
        for fragment in latest.get_fragments():
            for f in fragment.metadata.files:
                file, rec = self.path / "data" / f.path, self.path / _OWN / "files" / f"{f.path}.json"
                if not rec.exists():
                    raise GalleryError(f"{file}: no checksum recorded")
                if not file.exists():
                    raise GalleryError(f"{file}: missing (listed in version {latest.version})")
                if _file_record(file) != json.loads(rec.read_text()):
                    raise GalleryError(f"{file}: sha256 or size does not match its record (corrupt or modified)")


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _lance_errors(root: Path) -> Iterator[None]:
    """Lance's errors on a damaged dataset as GalleryError: its OSError / ValueError (Arrow's errors included), and
    the Rust panics that some damaged manifests cause (``pyo3_runtime.PanicException``, a BaseException that a
    server catching Exception would not catch)."""
    try:
        yield
    except GalleryError:
        raise
    except BaseException as e:
        if not isinstance(e, (OSError, ValueError)) and type(e).__name__ != "PanicException":
            raise
        raise GalleryError(f"{root}: unreadable Lance gallery ({type(e).__name__}: {str(e)[:200]})") from e


def _schema(header: Mapping[str, Any]) -> pa.Schema:
    m, c = len(header["attributes"]), header["dim"]
    fields = [pa.field("embedding", pa.list_(pa.float32(), c), nullable=False),
              pa.field("attr", pa.list_(pa.float16(), m * c), nullable=False),
              pa.field("probs", pa.list_(pa.float32(), m), nullable=False)]
    if header["aam_shape"] is not None:
        h, w = header["aam_shape"]
        fields.append(pa.field("aam", pa.list_(pa.float16(), m * h * w), nullable=False))
    fields.append(pa.field("meta", pa.string(), nullable=False))
    return pa.schema(fields, metadata={_KEY: json.dumps(dict(header)).encode()})


def _header_of(ds: lance.LanceDataset, root: Path) -> dict[str, Any]:
    raw = (ds.schema.metadata or {}).get(_KEY)
    try:
        header = json.loads(raw) if raw is not None else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise GalleryError(f"{root}: a Lance dataset, but not an AttriMeter gallery (no identity in its schema)")
    if _schema(header).remove_metadata() != ds.schema.remove_metadata():
        raise GalleryError(f"{root}: its columns do not match its identity")
    return header


def _first_row_of(ds: lance.LanceDataset, data_file: str) -> int:
    """Row position of the first row of the fragment that holds ``data_file`` (no deletions: rows are positions)."""
    first = 0
    for fragment in ds.get_fragments():
        meta = fragment.metadata
        if any(f.path == data_file for f in meta.files):
            return first
        first += meta.physical_rows
    raise GalleryError(f"{ds.uri}: the committed version does not list {data_file}")


def _manifest_file(root: Path, version: int) -> Path:
    """Lance's v2 manifest path names a version by ``u64::MAX - version``, zero-padded to 20 digits."""
    return root / "_versions" / f"{(1 << 64) - 1 - version:020d}.manifest"


def _file_record(file: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(file, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _write_record(file: Path, record: Mapping[str, Any]) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, file)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _as_ids(ids: Any, count: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InputError("gallery ids must be one integer or a 1-D sequence of them")
    bad = (arr < 0) | (arr >= count)
    if bad.any():
        raise UnknownIdError(f"gallery id {int(arr[bad][0])} is not in the gallery (it holds {count} entries)")
    return arr.astype(np.int64)
