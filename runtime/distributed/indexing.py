"""Distributed indexing on Ray Data: images → N gallery shards + ``shards.json`` (docs/architecture.md §11).

The pipeline (:func:`index_sharded`, ``attrimeter index --ray``)::

    image list ─ from_items ─▶ decode (Ray tasks, in parallel) ─▶ embed (an actor pool of Runtime backends, one GPU
    each where the cluster has GPUs) ─▶ shard writers (one Ray actor per shard, the only writer of its store)

Every image goes to shard ``blake2b-64(key) mod N``. A writer keeps the keys its shard holds and drops any it has
seen, so a batch delivered twice (Ray retries the batch of an embedding worker that died) is stored once; it appends
crash-safe segments of ``segment`` entries. Before embedding, the driver asks every writer which of its keys are
missing, so a run that resumes an interrupted one embeds only those. Rows a killed writer had buffered but not yet
written are found missing after the pass and embedded again (up to ``max_passes``). ``shards.json`` is published
first (fixing N and the model) and again at the end with the final counts; a shard that holds more than its
recorded count marks a run in progress or interrupted, which readers refuse.

The output folder must be on a file system that the driver and every writer see (one machine, or NFS and the like);
writer actors are named ``attrimeter-writer:<folder>:<shard>`` (see :func:`writer_actor_name`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from attrimeter.runtime.distributed.manifest import (
    SHARDS_NAME,
    manifest_for,
    read_manifest,
    shard_of,
    write_manifest,
)
from attrimeter.runtime.distributed.sharded import actor_error
from attrimeter.runtime.errors import GalleryError, InputError
from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery
from attrimeter.runtime.indexing import image_entry, image_files, new_storage, read_crop
from attrimeter.runtime.storage import StorageCodecs, default_mode, storage_codecs

if TYPE_CHECKING:
    from attrimeter.artefact.manifest import Manifest

__all__ = ["ShardWriter", "ShardedIndexReport", "index_sharded", "list_images", "writer_actor_name"]

# Keys sent to a writer per "which are missing?" call: bounds one message whatever the gallery's size.
_KEYS_PER_CALL = 1 << 16


@dataclass(frozen=True)
class ShardedIndexReport:
    """What :func:`index_sharded` did.

    Attributes:
        added: Entries this run wrote.
        already: Images whose key a shard already held (not embedded again).
        skipped: Unreadable images, or images the model gives NaN/inf for: ``(path, reason)``.
        counts: Entries per shard now.
        passes: Pipeline passes (more than 1 when rows lost with a killed writer were embedded again).
    """

    added: int
    already: int
    skipped: list[tuple[str, str]]
    counts: tuple[int, ...]
    passes: int


def list_images(images: str | Path) -> list[tuple[str, Path]]:
    """The images to index with their keys, sorted by key.

    Args:
        images: A folder (searched recursively for .jpg/.jpeg/.png/.bmp; key: the path relative to it) or a text
            file listing one image per line (key: the line; relative paths are relative to the list's folder; blank
            lines and lines starting with ``#`` are ignored).

    Returns:
        ``(key, path)`` pairs.

    Raises:
        InputError: No images, a missing folder or list, or a key listed twice.
    """
    root = Path(images).absolute()  # workers on other machines (or in other folders) read these paths
    if root.is_dir():
        found = [(p.relative_to(root).as_posix(), p) for p in image_files(root)]
    elif root.is_file():
        try:
            lines = root.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{root}: cannot read the image list ({e})") from e
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        found = [(k, Path(k) if Path(k).is_absolute() else root.parent / k) for k in keys]
    else:
        raise InputError(f"{root}: no such image folder or list")
    if not found:
        raise InputError(f"no images under {root}")
    found.sort(key=lambda kp: kp[0])
    for (a, _), (b, _) in zip(found, found[1:], strict=False):
        if a == b:
            raise InputError(f"{root}: image {a!r} is listed twice")
    return found


def writer_actor_name(out: str | Path, shard: str) -> str:
    """The Ray name of the writer actor of one shard of an indexing run into ``out``.

    Args:
        out: The sharded gallery's folder.
        shard: The shard's name.

    Returns:
        ``attrimeter-writer:<absolute folder>:<shard>``; one run per folder at a time (a second gets a clear error).
    """
    return f"attrimeter-writer:{Path(out).resolve()}:{shard}"


class ShardWriter:
    """The one writer of a shard's store during indexing: deduplicates by key, appends crash-safe segments.

    Runs as a Ray actor (restarted when it dies; its calls are retried, which deduplication makes harmless).

    Args:
        folder: The shard's gallery folder (it exists).
        segment: Entries per appended segment.

    Raises:
        GalleryError: The store is corrupt or another writer holds its lock.
    """

    def __init__(self, folder: str, segment: int) -> None:
        self.gallery = Gallery.open(folder, writable=True, verify=False, progress=False)
        self.segment = segment
        n = len(self.gallery)
        self.keys: set[str] = {m.get("key") for m in self.gallery.meta(np.arange(n))} if n else set()
        self._rows: list[dict[str, Any]] = []
        self._pending: set[str] = set()

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys of ``keys`` that the shard neither holds nor has buffered."""
        return [k for k in keys if k not in self.keys and k not in self._pending]

    def buffered(self) -> int:
        """Rows received but not yet written."""
        return len(self._pending)

    def add(self, keys: Sequence[str], embedding: np.ndarray, attr_embeddings: np.ndarray, probs: np.ndarray,
            aam: np.ndarray, meta: Sequence[str]) -> int:
        """Take embedded rows (those whose key is new); write a segment once ``segment`` rows are buffered.

        Args:
            keys: The rows' keys.
            embedding: ``[n, C]``.
            attr_embeddings: ``[n, M, C]``.
            probs: ``[n, M]``.
            aam: ``[n, M, h, w]``.
            meta: Each row's metadata as JSON (it holds the key).

        Returns:
            How many rows were new.
        """
        new, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self.keys and k not in self._pending and k not in seen:
                new.append(i)
                seen.add(k)
        if new:
            self._rows.append({"keys": [keys[i] for i in new], "embedding": embedding[new],
                               "attr": attr_embeddings[new], "probs": probs[new], "aam": aam[new],
                               "meta": [json.loads(meta[i]) for i in new]})
            self._pending.update(keys[i] for i in new)
        if len(self._pending) >= self.segment:
            self._write()
        return len(new)

    def flush(self) -> int:
        """Write what is buffered; the number of entries the shard holds."""
        self._write()
        return len(self.gallery)

    def _write(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        cat = {k: np.concatenate([r[k] for r in rows]) for k in ("embedding", "attr", "probs", "aam")}
        self.gallery.append(cat["embedding"], cat["attr"], cat["probs"], [m for r in rows for m in r["meta"]],
                            aam=cat["aam"] if self.gallery.aam_shape is not None else None)
        written = [k for r in rows for k in r["keys"]]
        self.keys.update(written)
        self._pending.difference_update(written)

    def close(self) -> None:
        """Release the store's writer lock (buffered rows are dropped: call :meth:`flush` first)."""
        self.gallery.close()


def _decode(batch: Mapping[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode a batch of images (unreadable ones marked, not raised).

    The metadata gains each file's sha256 (of the bytes embedded: a gallery without maps recomputes them from the file).
    """
    n = len(batch["key"])
    pixels = np.zeros((n, size[0], size[1], 3), np.uint8)
    ok = np.ones(n, bool)
    reason = np.full(n, "", dtype=object)
    meta = np.array(batch["meta"], dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            pixels[i], sha256 = read_crop(str(path), size)
            meta[i] = json.dumps({**json.loads(str(meta[i])), "sha256": sha256})
        except Exception as e:  # whatever is wrong with one file, the others still get indexed
            ok[i], reason[i] = False, str(e) or type(e).__name__
    return {"key": batch["key"], "path": batch["path"], "shard": batch["shard"], "meta": meta,
            "pixels": pixels, "ok": ok, "reason": reason}


class _Embedder:
    """Ray Data actor: embeds decoded batches with a :class:`Runtime` backend and hands the rows to the writers."""

    def __init__(self, export_dir: str, writers: Sequence[Any], options: Mapping[str, Any]) -> None:
        from attrimeter.runtime.runtime import Runtime, RuntimeConfig

        # A worker's batches are its own: they wait for the engine as long as it takes (a day bounds a hung engine).
        self.runtime = Runtime(export_dir, None, RuntimeConfig(queue_timeout_s=86400.0, **options))
        self.writers = list(writers)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        ok = np.asarray(batch["ok"], bool).copy()
        reason = np.asarray(batch["reason"], dtype=object).copy()
        good = np.flatnonzero(ok)
        if len(good):
            emb, finite = self._embed(batch["pixels"][good])
            for i in good[~finite]:
                ok[i], reason[i] = False, "the model gives NaN/inf embeddings"
            good, rows = good[finite], np.arange(int(finite.sum()))  # emb holds the finite rows only
            shards = np.asarray(batch["shard"])[good]
            calls = []
            for s in np.unique(shards):
                at, sel = good[shards == s], rows[shards == s]
                calls.append(self.writers[int(s)].add.remote(
                    [str(k) for k in batch["key"][at]], emb.embedding[sel], emb.attr_embeddings[sel],
                    emb.probs[sel], emb.aam[sel], [str(m) for m in batch["meta"][at]]))
            ray.get(calls)  # written or buffered by the writers before this batch counts as done
        return {"key": batch["key"], "path": batch["path"], "ok": ok, "reason": reason}

    def _embed(self, pixels: np.ndarray) -> tuple[Any, np.ndarray]:
        """(Embeddings of the images the model gives finite values for, which images those are)."""
        from attrimeter.runtime.runtime import Embeddings

        try:
            return self.runtime.embed(list(pixels)), np.ones(len(pixels), bool)
        except InputError:  # the model gives NaN/inf for some image: embed one by one to tell which
            parts = []
            for p in pixels:
                try:
                    parts.append(self.runtime.embed(p))
                except InputError:
                    parts.append(None)
        kept = [e for e in parts if e is not None]
        fields = ("embedding", "attr_embeddings", "probs", "aam")
        emb = Embeddings(**{f: np.concatenate([getattr(e, f) for e in kept]) for f in fields}) if kept else None
        return emb, np.array([e is not None for e in parts])


def index_sharded(export_dir: str | Path, images: str | Path, out: str | Path, *, shards: int,
                  backend: str = "auto", device: str | None = None, threads: int = 1, max_batch: int = 32,
                  workers: int | None = None, batch_size: int = 64, segment: int = 4096, metric: str = "l2",
                  verify: bool = True, progress: bool = True, max_passes: int = 3,
                  storage: str | None = None) -> ShardedIndexReport:
    """Embed images into a sharded gallery on the connected Ray cluster (created, or resumed/extended).

    Args:
        export_dir: The export folder (every worker must see it).
        images: An image folder or a list file (see :func:`list_images`).
        out: The sharded gallery's folder (new, or one this function wrote with the same ``shards`` and model).
        shards: Number of shards N.
        backend: The workers' backend (see :func:`~attrimeter.runtime.backends.open_backend`).
        device: The workers' backend device (None: the backend's choice; with GPUs, each worker gets its own).
        threads: CPU threads per worker (and CPUs Ray reserves for it).
        max_batch: Most images per engine call.
        workers: Most embedding workers (default: one per GPU of the cluster, else half its CPUs / ``threads``).
        batch_size: Images per Ray Data batch.
        segment: Entries per crash-safe segment the writers append.
        metric: A new gallery's search metric (``"l2"`` or ``"ip"``).
        verify: Check the export's file hashes in every worker.
        progress: Show a progress bar.
        max_passes: Most pipeline passes (passes after the first embed rows that killed writers lost).
        storage: A new sharded gallery's storage mode (None: :func:`~attrimeter.runtime.storage.default_mode`).
            Trained codecs are fitted once, here on the driver, on the first images by key, and every shard stores
            with that same state, so that the shards answer like one store would (docs/architecture.md §10, §11).
            An existing one keeps its own (another mode asked for is refused).

    Returns:
        A :class:`ShardedIndexReport`.

    Raises:
        InputError: Bad arguments or no images.
        GalleryError: ``out`` holds something else, another model's or metric's gallery, another number of shards
            or another storage mode, or another run is writing it; or rows were still missing after ``max_passes``.
    """
    import ray

    from attrimeter.artefact.manifest import load_manifest

    for name, value in (("shards", shards), ("threads", threads), ("max_batch", max_batch),
                        ("batch_size", batch_size), ("segment", segment), ("max_passes", max_passes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    manifest = load_manifest(export_dir, verify=verify)
    identity = {"dim": manifest.channels, "attributes": list(manifest.attribute_names),
                "aam_shape": list(manifest.aam_shape), "model": manifest.model_id, "metric": metric}
    size = manifest.image_size
    entries = list_images(images)
    root = Path(out).absolute()
    codecs = None
    if not (root / SHARDS_NAME).is_file():
        config = {"backend": backend, "device": device, "threads": threads, "max_batch": max_batch, "verify": verify}
        codecs = _fit_storage(export_dir, manifest, [p for _, p in entries], storage or default_mode(len(entries)),
                              config)
    names, before = _prepare(root, shards, identity, codecs, storage)
    if not ray.is_initialized():
        ray.init()
    writers = _start_writers(root, names, segment)
    try:
        assigned: list[list[tuple[str, Path]]] = [[] for _ in names]
        for key, path in entries:
            assigned[shard_of(key, shards)].append((key, path))
        todo = _missing(writers, assigned)
        already = len(entries) - sum(len(t) for t in todo)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        pool = workers or (gpus if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // (2 * threads)))
        options = {"backend": backend, "device": device, "threads": threads, "max_batch": max_batch,
                   "verify": verify}
        skipped: dict[str, tuple[str, str]] = {}
        passes = 0
        with tqdm(total=sum(len(t) for t in todo), desc=f"index {root.name}", unit="img",
                  disable=not progress) as bar:
            while any(todo) and passes < max_passes:
                passes += 1
                rows = sorted(({"key": k, "path": str(p), "shard": s, "meta": json.dumps(image_entry(p, k))}
                               for s, t in enumerate(todo) for k, p in t), key=lambda r: r["key"])
                for batch in _run(rows, str(Path(export_dir).absolute()), writers, options, size, pool, gpus, threads,
                                  batch_size):
                    for key, path, ok, why in zip(batch["key"], batch["path"], batch["ok"], batch["reason"],
                                                  strict=True):
                        if not ok:
                            skipped[str(key)] = (str(path), str(why))
                    bar.update(len(batch["key"]))
                ray.get([wr.flush.remote() for wr in writers])
                todo = [[(k, p) for k, p in t if k not in skipped] for t in _missing(writers, assigned)]
                bar.total += sum(len(t) for t in todo)
        if any(todo):
            lost = [k for t in todo for k, _ in t]
            raise GalleryError(f"{root}: {len(lost)} images were still not written after {passes} passes (writers "
                               f"kept failing?), e.g. {lost[:3]}; run again to resume")
        counts = tuple(ray.get([wr.flush.remote() for wr in writers]))
    finally:
        _stop_writers(writers)
    write_manifest(root, manifest_for(identity, names, counts))
    return ShardedIndexReport(added=sum(counts) - sum(before), already=already, skipped=list(skipped.values()),
                              counts=counts, passes=passes)


def _fit_storage(export_dir: str | Path, manifest: Manifest, images: list[Path], mode: str,
                 config: Mapping[str, Any]) -> StorageCodecs:
    """A new sharded gallery's codecs, fitted once on the driver (every shard gets the same state)."""
    from attrimeter.runtime.runtime import Runtime, RuntimeConfig

    codecs = storage_codecs(mode, manifest.channels, len(manifest.attribute_names), manifest.aam_shape)
    if not any(c is not None and c.trainable for c in (codecs.attr, codecs.aam)):
        return codecs
    with Runtime(export_dir, None, RuntimeConfig(**config)) as rt:
        return new_storage(mode, images, rt.embed, rt.image_size, dim=manifest.channels,
                           attributes=len(rt.attributes), aam_shape=manifest.aam_shape, batch=rt.config.max_batch)


def _prepare(root: Path, shards: int, identity: dict[str, Any], codecs: StorageCodecs | None,
             mode: str | None) -> tuple[list[str], list[int]]:
    """Create or check the sharded gallery folder and publish its manifest with the current counts.

    New shards are created like an existing one (a run that stopped before publishing the manifest: a fit made again
    could differ), else with ``codecs``; existing ones must store in ``mode`` when it is given.

    Returns:
        The shard names and their entry counts now.
    """
    width = max(3, len(str(shards - 1)))
    names = [f"shard-{i:0{width}d}" for i in range(shards)]
    if (root / SHARDS_NAME).is_file():
        manifest, _ = read_manifest(root)
        if manifest.identity() != identity:
            wrong = sorted(k for k, v in identity.items() if manifest.identity()[k] != v)
            raise GalleryError(f"{root} holds a sharded gallery with another {', '.join(wrong)}; index into a new "
                               "folder")
        if len(manifest.shards) != shards:
            raise GalleryError(f"{root} was indexed into {len(manifest.shards)} shards (an image's shard depends on "
                               f"N): run with --shards {len(manifest.shards)}, or index into a new folder")
        names = [s.name for s in manifest.shards]
    elif root.exists():
        expected = set(names) | {SHARDS_NAME + ".tmp"}
        others = sorted(p.name for p in root.iterdir() if p.name not in expected)
        if others:
            raise GalleryError(f"{root}: not empty and not a sharded gallery ({', '.join(others[:3])}); index into a "
                               "new folder")
    root.mkdir(parents=True, exist_ok=True)
    held: dict[str, int] = {}
    existing: StorageCodecs | None = None
    for name in names:
        folder = root / name
        if (folder / MANIFEST_NAME).is_file():
            with Gallery.open(folder, verify=False, progress=False) as g:
                found = {"dim": g.dim, "attributes": list(g.attributes),
                         "aam_shape": None if g.aam_shape is None else list(g.aam_shape), "model": g.model,
                         "metric": g.metric}
                if found != identity:
                    raise GalleryError(f"{folder}: a gallery of another model or metric; index into a new folder")
                if mode is not None and g.storage.mode != mode:
                    raise GalleryError(f"{folder} stores {g.storage.mode!r} (fixed when it was created), not {mode!r}; "
                                       "index into a new folder to change it")
                held[name] = len(g)
                existing = existing or g.storage
    codecs = existing or codecs  # a shard made again stores like the others
    for name in names:
        if name not in held:
            Gallery.create(root / name, dim=identity["dim"], attributes=identity["attributes"],
                           aam_shape=tuple(identity["aam_shape"]), model=identity["model"],
                           metric=identity["metric"], storage=codecs or "float16").close()
            held[name] = 0
    counts = [held[name] for name in names]
    write_manifest(root, manifest_for(identity, names, counts))  # N and the model are fixed from now on
    return names, counts


def _start_writers(root: Path, names: Sequence[str], segment: int) -> list[Any]:
    import ray
    from ray.exceptions import RayActorError

    remote = ray.remote(ShardWriter)
    writers = []
    try:
        for name in names:
            # num_cpus=0: writing is I/O; restarted when killed, calls retried (deduplicated by key).
            writers.append(remote.options(name=writer_actor_name(root, name), num_cpus=0, max_restarts=-1,
                                          max_task_retries=-1).remote(str(root / name), segment))
        ray.get([w.buffered.remote() for w in writers])
    except ValueError as e:  # the actor name is taken
        _stop_writers(writers)
        raise GalleryError(f"{root}: another indexing run is writing it ({e})") from None
    except RayActorError as e:  # a writer's __init__ failed: e.g. the store is locked by another run's writer
        _stop_writers(writers)
        raise GalleryError(f"{root}: a shard writer could not open its store: {actor_error(e)}") from None
    except BaseException:
        _stop_writers(writers)
        raise
    return writers


def _stop_writers(writers: Sequence[Any]) -> None:
    import ray

    for w in writers:
        try:
            ray.get(w.close.remote())
        except Exception:  # already dead: its lock went with its process
            pass
        ray.kill(w, no_restart=True)


def _missing(writers: Sequence[Any], assigned: Sequence[Sequence[tuple[str, Path]]]) -> list[list[tuple[str, Path]]]:
    """Per shard, the assigned images its writer neither holds nor buffers."""
    import ray

    calls = [[w.missing.remote([k for k, _ in pairs[a:a + _KEYS_PER_CALL]])
              for a in range(0, len(pairs), _KEYS_PER_CALL)] for w, pairs in zip(writers, assigned, strict=True)]
    out = []
    for pairs, refs in zip(assigned, calls, strict=True):
        absent = {k for ref in refs for k in ray.get(ref)}
        out.append([(k, p) for k, p in pairs if k in absent])
    return out


def _run(rows: list[dict[str, Any]], export_dir: str, writers: Sequence[Any], options: Mapping[str, Any],
         size: tuple[int, int], pool: int, gpus: int, threads: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """One Ray Data pass over ``rows``: decode → embed → writers; yields the per-image outcome batches."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over images
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(_decode, fn_kwargs={"size": size}, batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(_Embedder, fn_constructor_kwargs={"export_dir": export_dir, "writers": list(writers),
                                                          "options": dict(options)},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool), num_cpus=threads,
                        num_gpus=1 if gpus else 0)  # Ray Data restarts a dead pool actor and retries its batches
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")

