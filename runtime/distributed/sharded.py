"""A gallery split into shards, searched by fan-out and merged exactly (docs/architecture.md §11).

:class:`ShardedGallery` opens a sharded gallery (``attrimeter index --ray``: a ``shards.json`` listing complete
gallery stores) and offers the read side of :class:`~attrimeter.runtime.gallery.Gallery` over all of it, so the
:class:`~attrimeter.runtime.runtime.Runtime` serves it like one store. Two modes:

* ``"local"``: every shard is opened in this process (a :class:`ShardServer` each; calls run on a thread pool).
* ``"ray"``: every shard is held by a Ray actor, anywhere in the cluster the shard's folder is visible. Actors that
  die are restarted by Ray (they reopen their shard); a call in flight when one dies is not retried.

A query fans out once: every shard returns its top-k with the rows that explain them; the merge keeps the k best by
the keys a single store ranks by (:meth:`Gallery.rank <attrimeter.runtime.gallery.Gallery.rank>`: exact keys computed
row by row, the same wherever an entry is stored; the weighted scan's scores), ties to the lower global id, as a
single store holding the shards' entries in global-id order breaks them, so results equal that store's. The caller
explains only the final k, from the rows that came back. (The weighted scan's float32 scores carry rounding that can
depend on an entry's place in its chunk, so of candidates within that rounding of the k-th score, which make the cut
can differ between layouts; the k winners are then ranked by exactly recomputed scores either way.)

A shard that does not answer (actor dead or restarting, node lost, no answer within ``timeout_s``, its store failing)
makes the call raise :class:`~attrimeter.runtime.errors.ShardUnavailableError` naming it, or, with ``partial=True``,
answer from the shards that did, with :attr:`ShardedHits.missing` naming the others. Never a silently incomplete
answer. Errors in the request itself (bad queries, unknown ids) are raised as they are.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.runtime.decompose import check_weights
from attrimeter.runtime.distributed.hits import RowSet, ShardedHits
from attrimeter.runtime.distributed.manifest import ShardedManifest, read_manifest, sharded_root
from attrimeter.runtime.distributed.shard import ShardServer
from attrimeter.runtime.errors import GalleryError, InputError, ShardUnavailableError, UnknownIdError
from attrimeter.runtime.gallery_index import IndexChoice

__all__ = ["MODES", "ShardedGallery", "actor_error"]

MODES = ("local", "ray")
# Shard actors: one CPU each (Ray sets OMP_NUM_THREADS to it: FAISS searches a shard on that many threads), spread
# over the nodes, restarted when they die; a few calls at once (searches are thread-safe, and one slow call should
# not hold up the others).
DEFAULT_ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD", "max_restarts": -1,
                                         "max_task_retries": 0, "max_concurrency": 4}
# Errors of the request itself: every shard would say the same, so they are raised rather than counted as missing.
_REQUEST_ERRORS = (InputError, UnknownIdError)

log = logging.getLogger(__name__)


class ShardedGallery:
    """A read-only gallery over the shards a ``shards.json`` lists; global ids run through the shards in order.

    Use :meth:`open`. Thread-safe: concurrent searches fan out independently.
    """

    def __init__(self, root: Path, manifest: ShardedManifest, raw: bytes, servers: Sequence[Any], *, mode: str,
                 partial: bool, timeout_s: float) -> None:
        """Use :meth:`open`."""
        self.path = root
        self.manifest = manifest
        self._raw = raw
        self._servers = tuple(servers)
        self.mode = mode
        self.partial = partial
        self.timeout_s = timeout_s
        self._first_ids = manifest.first_ids()
        self._count = manifest.count
        self._pool = ThreadPoolExecutor(min(len(servers), 8), thread_name_prefix="attrimeter-shard") \
            if mode == "local" else None
        self._closed = False
        self._missing: tuple[str, ...] = ()
        self._index_kinds: str | None = None  # once every shard reported its loaded index (fixed from then on)

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "local", verify: bool = True, partial: bool = False,
             timeout_s: float = 30.0, open_timeout_s: float = 600.0,
             actor_options: Mapping[str, Any] | None = None, index: IndexChoice | None = None) -> ShardedGallery:
        """Open a sharded gallery: every shard's store is opened and checked against the manifest.

        Args:
            path: The sharded gallery's folder or its ``shards.json``.
            mode: ``"local"`` (shards opened in this process) or ``"ray"`` (one actor per shard; Ray must be
                initialised, e.g. ``ray.init(address=...)``).
            verify: Check the sha256 of every shard's files when opening.
            partial: Default of the search methods' ``partial``: answer from the shards that answer, naming the
                others, instead of raising.
            timeout_s: How long a call waits for the shards (Ray mode) before counting the silent ones as missing.
            open_timeout_s: How long opening waits for the shard actors to load their stores (Ray mode).
            actor_options: Ray options of the shard actors, over :data:`DEFAULT_ACTOR_OPTIONS` (e.g.
                ``{"num_cpus": 0.5}`` or ``{"resources": {"gallery": 1}}``).
            index: Every shard's search index (see :meth:`Gallery.open <attrimeter.runtime.gallery.Gallery.open>`;
                None: each shard's saved one, else exact).

        Returns:
            The open gallery.

        Raises:
            GalleryError: Not a sharded gallery, a malformed manifest, or a shard that is missing, corrupt, made by
                another model, or holding another number of entries than the manifest records (named).
            InputError: A bad mode or timeout.
        """
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not timeout_s > 0 or not open_timeout_s > 0:
            raise InputError("timeouts must be positive")
        root = sharded_root(path)
        if root is None:
            raise GalleryError(f"{path}: not a sharded gallery (no shards.json)")
        root = root.absolute()  # shard actors may run in another folder
        manifest, raw = read_manifest(root)
        args = [(str(manifest.folder(root, i)), s.name, manifest.identity(), s.count, verify, index)
                for i, s in enumerate(manifest.shards)]
        servers = _open_local(args) if mode == "local" else _open_actors(args, actor_options, open_timeout_s)
        return cls(root, manifest, raw, servers, mode=mode, partial=partial, timeout_s=timeout_s)

    # ------------------------------------------------------------------ properties (Gallery's)

    @property
    def missing_shards(self) -> tuple[str, ...]:
        """The shards that did not answer the last fan-out (empty when all did, or before the first)."""
        return self._missing

    @property
    def index_kind(self) -> str | None:
        """The shards' search index kinds, joined by commas (None when no shard answers).

        Kept once every shard has reported a loaded index: ``/metrics`` and ``/health`` read it on every call.
        """
        if self._index_kinds is not None:
            return self._index_kinds
        if self._pool is not None:
            found = [server.index_kind() for server in self._servers]
        else:
            import ray
            from ray.exceptions import RayError

            refs = [server.index_kind.remote() for server in self._servers]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(self.timeout_s, 5.0))
            found = []
            for ref in ready:
                try:
                    found.append(ray.get(ref))
                except RayError:  # a shard that does not answer has no kind to report
                    continue
        kinds = ",".join(sorted({kind for kind in found if kind is not None})) or None
        if len(found) == len(self._servers) and None not in found:
            self._index_kinds = kinds
        return kinds

    @property
    def dim(self) -> int:
        """Embedding width C."""
        return self.manifest.dim

    @property
    def attributes(self) -> tuple[str, ...]:
        """Attribute names, in the model's order."""
        return self.manifest.attributes

    @property
    def aam_shape(self) -> tuple[int, int] | None:
        """``(h, w)`` of the stored attention maps, or None."""
        return self.manifest.aam_shape

    @property
    def model(self) -> str:
        """Identity of the model that embedded the gallery."""
        return self.manifest.model

    @property
    def metric(self) -> str:
        """``"l2"`` or ``"ip"``."""
        return self.manifest.metric

    @property
    def writable(self) -> bool:
        """Always False: a sharded gallery grows through ``attrimeter index --ray``, not through a server."""
        return False

    @property
    def shard_names(self) -> tuple[str, ...]:
        """The shards' names, in global-id order."""
        return tuple(s.name for s in self.manifest.shards)

    @property
    def actors(self) -> tuple[Any, ...]:
        """The shard actors (Ray mode; empty in local mode), in shard order: for supervision and tests."""
        return self._servers if self.mode == "ray" else ()

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"ShardedGallery({str(self.path)!r}, {len(self)} entries, {len(self._servers)} shards, mode="
                f"{self.mode!r}, metric={self.metric!r})")

    # ------------------------------------------------------------------ search

    def search_rows(self, queries: np.ndarray, k: int, *, aam: bool = False,
                    partial: bool | None = None) -> ShardedHits:
        """Exact k-nearest-neighbour search over every shard, with the rows that explain the hits.

        Args:
            queries: Global query embeddings, float32 ``[Q, C]``, finite.
            k: Hits per query (> 0); fewer when the gallery (or the shards that answered) hold fewer.
            aam: Also fetch the hits' attention maps (for overlays).
            partial: Answer from the shards that answer (None: the gallery's default).

        Returns:
            :class:`ShardedHits` (``d`` the exact Euclidean distances; ``keys`` the ranking: d, or ``−cos`` for an
            ``"ip"`` gallery; ties by the lower global id).

        Raises:
            InputError: Bad queries or k.
            ShardUnavailableError: A shard did not answer (without ``partial``), or none did.
        """
        kk = _check_k(k)
        q = _check_array(queries, "queries", (None, self.dim))
        return self._top_k("top_k", {i: (q, kk, aam) for i in range(len(self._servers))}, kk, partial=partial)

    def weighted_search_rows(self, attr_queries: np.ndarray, weights: Sequence[float] | np.ndarray, k: int, *,
                             aam: bool = False, partial: bool | None = None) -> ShardedHits:
        """Exact top-k by the attribute-weighted score ``Σ_k w_k d_k`` (scanned on every shard), with the hits' rows.

        The keys are the scan's float32 scores; the runtime re-ranks the k winners by their exactly recomputed
        scores, as it does for one store.

        Args:
            attr_queries: Per-attribute query embeddings ``[Q, M, C]``.
            weights: ``[M]`` attribute weights (see :func:`~attrimeter.runtime.decompose.check_weights`).
            k: Hits per query.
            aam: Also fetch the hits' attention maps.
            partial: Answer from the shards that answer (None: the gallery's default).

        Returns:
            :class:`ShardedHits` (``d`` None).

        Raises:
            InputError: Bad queries, weights or k.
            ShardUnavailableError: A shard did not answer (without ``partial``), or none did.
        """
        kk = _check_k(k)
        w = check_weights(weights, len(self.attributes))
        q = _check_array(attr_queries, "attr_queries", (None, len(self.attributes), self.dim))
        return self._top_k("weighted_top_k", {i: (q, w, kk, aam) for i in range(len(self._servers))}, kk,
                           partial=partial)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`Gallery.search <attrimeter.runtime.gallery.Gallery.search>`, over all shards.

        Args:
            queries: float32 ``[Q, C]``.
            k: Neighbours per query.

        Returns:
            ``(distances float32 [Q, k'], global ids int64 [Q, k'])``, best first.

        Raises:
            ShardUnavailableError: A shard did not answer (always: this answer could not say which are missing).
        """
        hits = self.search_rows(queries, k, partial=False)
        return hits.keys if hits.d is None else hits.d, hits.ids

    def weighted_search(self, attr_queries: np.ndarray, weights: Sequence[float] | np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact weighted scan's ``(scores [Q, k'], global ids [Q, k'])`` over all shards, best first.

        Args:
            attr_queries: ``[Q, M, C]``.
            weights: ``[M]``.
            k: Hits per query.

        Returns:
            Like :func:`~attrimeter.runtime.decompose.weighted_scan` over the whole gallery.

        Raises:
            ShardUnavailableError: A shard did not answer (always: this answer could not say which are missing).
        """
        hits = self.weighted_search_rows(attr_queries, weights, k, partial=False)
        return hits.keys, hits.ids

    def _top_k(self, method: str, args: dict[int, tuple[Any, ...]], k: int, *, partial: bool | None) -> ShardedHits:
        answers, missing = self._fan_out(method, args, self.partial if partial is None else partial)
        order = sorted(answers)
        keys = np.concatenate([answers[i]["keys"] for i in order], axis=1)
        gids = np.concatenate([answers[i]["ids"] + self._first_ids[i] for i in order], axis=1)
        pick = np.lexsort((gids, keys), axis=1)[:, :k]  # ties (the k-th place's too) go to the lower id
        ids = np.take_along_axis(gids, pick, 1)
        d = None
        if answers[order[0]]["d"] is not None:
            d = np.take_along_axis(np.concatenate([answers[i]["d"] for i in order], axis=1), pick, 1)
        rows = self._row_set([(i, answers[i]["rows"]) for i in order], np.unique(ids))
        return ShardedHits(ids=ids, keys=np.take_along_axis(keys, pick, 1), d=d, rows=rows, missing=missing)

    # ------------------------------------------------------------------ rows by id (Gallery's read API)

    def gather(self, ids: Any, *, aam: bool = False) -> RowSet:
        """The stored rows of gallery entries, fetched from their shards in one fan-out.

        Args:
            ids: Global ids (an int or a 1-D sequence).
            aam: Also fetch their attention maps.

        Returns:
            A :class:`RowSet` holding them.

        Raises:
            UnknownIdError: An id the gallery does not hold.
            InputError: Ids that are not integers.
            ShardUnavailableError: A shard holding some of them did not answer.
        """
        wanted = np.unique(_global_ids(ids, self._count))
        shard = np.searchsorted(self._first_ids, wanted, side="right") - 1
        args = {int(s): (wanted[shard == s] - self._first_ids[s], aam) for s in np.unique(shard)}
        answers, _ = self._fan_out("rows", args, partial=False) if args else ({}, ())
        return self._row_set(sorted(answers.items()), wanted)

    def embeddings(self, ids: Any) -> np.ndarray:
        """Global embeddings, float32 ``[len(ids), C]``."""
        return self.gather(ids).embeddings(_global_ids(ids, self._count))

    def attr_embeddings(self, ids: Any) -> np.ndarray:
        """Per-attribute embeddings, float32 ``[len(ids), M, C]``."""
        return self.gather(ids).attr_embeddings(_global_ids(ids, self._count))

    def probs(self, ids: Any) -> np.ndarray:
        """Predicted P(label 1) per attribute, float32 ``[len(ids), M]``."""
        return self.gather(ids).probs(_global_ids(ids, self._count))

    def aam(self, ids: Any) -> np.ndarray | None:
        """Attention maps, float32 ``[len(ids), M, h, w]``, or None when the gallery stores none."""
        rows = self.gather(ids, aam=self.aam_shape is not None)
        return rows.aam(_global_ids(ids, self._count))

    def meta(self, ids: Any) -> list[dict[str, Any]]:
        """Metadata, one dict per id, ``"id"`` the global id."""
        return self.gather(ids).meta(_global_ids(ids, self._count))

    def _row_set(self, parts: Sequence[tuple[int, dict[str, Any]]], keep: np.ndarray) -> RowSet:
        """Shard answers' rows → one :class:`RowSet` of the global ids in ``keep`` (sorted)."""
        fields: dict[str, list[Any]] = {"ids": [], "embedding": [], "attr": [], "probs": [], "aam": []}
        meta: list[dict[str, Any]] = []
        for s, rows in parts:
            gids = rows["ids"] + self._first_ids[s]
            mask = np.isin(gids, keep)
            fields["ids"].append(gids[mask])
            for name in ("embedding", "attr", "probs"):
                fields[name].append(rows[name][mask])
            if rows["aam"] is not None:
                fields["aam"].append(rows["aam"][mask])
            meta += [{**m, "id": int(g)} for m, g, ok in zip(rows["meta"], gids, mask, strict=True) if ok]
        m, c = len(self.attributes), self.dim
        empty = {"ids": np.zeros(0, np.int64), "embedding": np.zeros((0, c), np.float32),
                 "attr": np.zeros((0, m, c), np.float16), "probs": np.zeros((0, m), np.float32)}
        cat = {k: np.concatenate(v) if v else empty[k] for k, v in fields.items() if k != "aam"}
        maps = np.concatenate(fields["aam"]) if fields["aam"] else None
        order = np.argsort(cat["ids"], kind="stable")  # shards' global id ranges are disjoint and ascending already
        return RowSet(ids=cat["ids"][order], embedding=cat["embedding"][order], attr=cat["attr"][order],
                      probs_rows=cat["probs"][order], meta_rows=tuple(meta[i] for i in order),
                      maps=None if maps is None else maps[order], metric=self.metric)

    # ------------------------------------------------------------------ fan-out

    def _fan_out(self, method: str, args: Mapping[int, tuple[Any, ...]],
                 partial: bool) -> tuple[dict[int, Any], tuple[str, ...]]:
        """Call ``method`` on the shards in ``args``; (answers by shard, names of the missing ones).

        Raises:
            InputError, UnknownIdError: From a shard, about the request.
            ShardUnavailableError: Shards did not answer and ``partial`` is off, or none answered.
        """
        self._check_open()
        if self.mode == "local":
            answers, failures = self._call_local(method, args)
        else:
            answers, failures = self._call_actors(method, args)
        missing = tuple(self.manifest.shards[i].name for i in sorted(failures))
        self._missing = missing  # what /health reports until the next fan-out
        if failures:
            detail = "; ".join(f"{self.manifest.shards[i].name}: {failures[i]}" for i in sorted(failures))
            if not partial or not answers:
                hint = "" if partial else " (partial=True answers from the others, naming the missing shards)"
                raise ShardUnavailableError(f"{self.path}: {len(failures)} of {len(self._servers)} shards did not "
                                            f"answer: {detail}{hint}", missing)
            log.warning("partial answer without %s: %s", ", ".join(missing), detail)
        return answers, missing

    def _call_local(self, method: str, args: Mapping[int, tuple[Any, ...]]) -> tuple[dict[int, Any], dict[int, str]]:
        assert self._pool is not None
        futures = {i: self._pool.submit(getattr(self._servers[i], method), *a) for i, a in args.items()}
        answers, failures = {}, {}
        for i, future in futures.items():
            try:
                answers[i] = future.result()
            except _REQUEST_ERRORS:
                raise
            except Exception as e:  # a failing store is a shard that does not answer; the request may go on
                log.warning("shard %s failed", self.manifest.shards[i].name, exc_info=True)
                failures[i] = f"{type(e).__name__}: {e}"
        return answers, failures

    def _call_actors(self, method: str, args: Mapping[int, tuple[Any, ...]]) -> tuple[dict[int, Any], dict[int, str]]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        refs = {i: getattr(self._servers[i], method).remote(*a) for i, a in args.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        done = set(ready)
        answers, failures = {}, {}
        for i, ref in refs.items():
            if ref not in done:
                failures[i] = f"no answer within {self.timeout_s:g} s"
                continue
            try:
                answers[i] = ray.get(ref)
            except RayTaskError as e:
                if isinstance(e.cause, _REQUEST_ERRORS):
                    raise e.cause from None
                failures[i] = f"{type(e.cause).__name__}: {e.cause}"
            except RayError as e:  # the actor died or is restarting, its node was lost, ...
                failures[i] = f"{type(e).__name__}: {_first_line(e)}"
        return answers, failures

    # ------------------------------------------------------------------ lifecycle

    def load_index(self) -> None:
        """Nothing to do: every shard loads its search index when it opens."""
        self._check_open()

    def refresh(self) -> int:
        """Check that the manifest still lists what this handle serves.

        Returns:
            The number of entries.

        Raises:
            GalleryError: The manifest was re-published (an indexing run added entries): global ids are positions in
                shard order and would move, so the new gallery is served only once it is opened again.
        """
        self._check_open()
        manifest, raw = read_manifest(self.path)
        if raw != self._raw:
            raise GalleryError(f"{self.path}: re-published with {manifest.count} entries (this server holds "
                               f"{self._count}); restart the server to serve them (global ids would move)")
        return self._count

    def append(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """Refused: a sharded gallery grows through ``attrimeter index --ray``.

        Raises:
            GalleryError: Always.
        """
        raise GalleryError(f"{self.path}: a sharded gallery is read-only here; add images with `attrimeter index "
                           "--ray --images ... --out` on it")

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryError(f"{self.path}: the gallery is closed")

    def close(self) -> None:
        """Close the shards (local) or end the shard actors (Ray); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            for server in self._servers:
                server.close()
        else:
            _kill(self._servers)

    def __enter__(self) -> ShardedGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


def _open_local(args: Sequence[tuple[Any, ...]]) -> list[ShardServer]:
    servers: list[ShardServer] = []
    try:
        for a in args:
            servers.append(ShardServer(*a))
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def _open_actors(args: Sequence[tuple[Any, ...]], options: Mapping[str, Any] | None, timeout_s: float) -> list[Any]:
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    if not ray.is_initialized():
        raise GalleryError("mode='ray' needs a Ray connection: call ray.init(address=...) first")
    remote = ray.remote(ShardServer).options(**{**DEFAULT_ACTOR_OPTIONS, **(options or {})})
    actors = [remote.remote(*a) for a in args]
    pings = [a.ping.remote() for a in actors]
    try:
        ready, waiting = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        if waiting:
            names = [args[i][1] for i, p in enumerate(pings) if p in set(waiting)]
            raise GalleryError(f"shards {', '.join(names)} did not open within {timeout_s:g} s (not enough cluster "
                               "resources for their actors? see actor_options)")
        for a, p in zip(args, pings, strict=True):
            try:
                ray.get(p)
            except RayError as e:
                raise GalleryError(f"shard {a[1]} did not open: {actor_error(e)}") from None
    except (GalleryError, GetTimeoutError, KeyboardInterrupt):
        _kill(actors)
        raise
    return actors


def _kill(actors: Sequence[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def actor_error(e: BaseException) -> str:
    """What a Ray actor error says: the error its constructor or method raised (Ray ends its text with it)."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InputError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_array(x: Any, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    want = "[" + ", ".join("n" if s is None else str(s) for s in shape) + "]"
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise InputError(f"{name} must be a floating numpy array {want}")
    if x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape, strict=True)):
        raise InputError(f"{name} must have shape {want}, got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} holds NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def _global_ids(ids: Any, count: int) -> np.ndarray:
    """Global ids as int64 [n], each in [0, count)."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InputError(f"gallery ids must be one integer or a 1-D sequence of them, got shape {list(arr.shape)}")
    if arr.dtype.kind == "O":
        try:
            arr = np.array([operator.index(v) for v in arr], np.int64)
        except TypeError as e:
            raise InputError(f"gallery ids must be integers ({e})") from e
    elif arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"gallery ids must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= count)
    if bad.any():
        raise UnknownIdError(f"gallery id {int(arr[bad][0])} is not in the gallery (it holds {count} entries)")
    return arr
