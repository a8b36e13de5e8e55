"""``Runtime(export_dir, gallery)``: embed, search and explain with an exported model, no torch needed (DESIGN §6).

One object ties an export (any backend), a dynamic batcher and an optional gallery store together::

    with Runtime("export/", "gallery/") as rt:
        for result in rt.search(["query.jpg"], k=10, weights={"upblack": 0}):
            for m in result.matches:
                print(m.to_text())  # rank, key, d, the largest shares, the predictions that differ

Search ranks the gallery by the target distance d with exact FAISS search (or, with attribute weights, by
``Σ_k w_k d_k`` with an exact scan of the attribute store), then explains each hit: per-attribute distances d_k, shares
p_k = d_k / Σ_j d_j, contributions c_k = p_k·d (they sum to d), d̂, and the predicted attributes on which query and hit
differ. All methods are thread-safe: concurrent callers' images are batched together on one inference thread.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from attrimeter.explanation import QueryResult, explanations, predictions
from attrimeter.runtime.backends import Backend, BackendError, open_backend
from attrimeter.runtime.batching import DynamicBatcher
from attrimeter.runtime.decompose import Decomposition, check_weights, explain_rows, weighted_scan
from attrimeter.runtime.errors import CorruptGalleryError, GalleryError, InputError
from attrimeter.runtime.fused_search import FusedSearch
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.images import ImageSource, as_sources, load_image, to_input

__all__ = ["IMAGE_SUFFIXES", "MAX_HITS", "MAX_KEY_CHARS", "MAX_OVERLAYS", "Embeddings", "IndexReport", "Runtime"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Most overlay pictures one call may ask for (queries × hits × attributes): each is a full-size RGB crop.
MAX_OVERLAYS = 256
# Most explained hits one call may ask for (queries × k): each carries M+1 embeddings and M numbers per field.
MAX_HITS = 10_000
# Longest key :meth:`Runtime.add` stores: keys come back with every hit, so megabyte keys would make a small search
# answer megabytes.
MAX_KEY_CHARS = 1024
# Hits explained per step: bounds the gathered float32 rows (hits × (M+1) × C) whatever the request.
_EXPLAIN_CHUNK = 1024
# Latency histogram bounds in seconds (Prometheus-style cumulative buckets).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)


@dataclass(frozen=True)
class Embeddings:
    """What the model says about a batch of images.

    Attributes:
        embedding: The target's global embedding f ``[B, C]`` (d is measured on it).
        attr_embeddings: Per-attribute embeddings f_k ``[B, M, C]``.
        probs: Predicted probability of each attribute's label 1 ``[B, M]``.
        aam: Attention maps ``[B, M, h, w]``.
    """

    embedding: np.ndarray
    attr_embeddings: np.ndarray
    probs: np.ndarray
    aam: np.ndarray

    def stacked(self) -> np.ndarray:
        """``[B, M+1, C]``: row 0 f, rows 1..M the f_k (the attr_distance layout)."""
        return np.concatenate([self.embedding[:, None], self.attr_embeddings], axis=1)

    def to_dict(self, attributes: Sequence[str], meanings: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """JSON-ready: per image its embeddings as lists and its predicted attributes in words.

        Args:
            attributes: Attribute names (the manifest's order).
            meanings: The meaning of label 0 and 1 of each attribute.

        Returns:
            One dict per image.
        """
        return [{"embedding": self.embedding[i].tolist(), "attr_embeddings": self.attr_embeddings[i].tolist(),
                 "attributes": predictions(attributes, meanings, self.probs[i])} for i in range(len(self.embedding))]


class IndexReport(NamedTuple):
    """What :meth:`Runtime.index_folder` did.

    Attributes:
        added: Images added to the gallery.
        skipped: Unreadable images: ``(path, reason)``.
    """

    added: int
    skipped: list[tuple[str, str]]


class _Latency:
    """A cumulative latency histogram (Prometheus buckets)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> dict[str, Any]:
        cumulative = np.cumsum(self.counts).tolist()
        return {"buckets": [*zip(LATENCY_BUCKETS, cumulative[:-1], strict=True), ("+Inf", cumulative[-1])],
                "sum": self.total, "count": cumulative[-1]}


class Runtime:
    """An export, a backend, a dynamic batcher and an optional gallery: embed, search, explain, add.

    Args:
        export_dir: The export folder (``attrimeter export``); its manifest and file hashes are checked.
        gallery: A gallery folder (``attrimeter index``), an open :class:`Gallery`, or None.
        backend: ``"auto"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"torch"`` (see :mod:`attrimeter.runtime.backends`).
        device: Backend device (None: the backend's choice).
        threads: CPU threads of the backend.
        checkpoint: The source checkpoint, for the torch backend when it has moved.
        max_batch: Most images per engine call.
        max_wait_ms: How long a request waits for others to share its batch.
        queue_size: Most requests waiting for the engine (then :class:`OverloadedError`).
        queue_timeout_s: The longest a call may wait for the engine: refused with :class:`OverloadedError` at once
            when the queued images would take longer at the engine's measured rate, or when its time runs out in the
            queue (see :mod:`attrimeter.runtime.batching`).
        decode_workers: Threads decoding images of multi-image calls (off the inference thread).
        verify: Check the sha256 of the export's and the gallery's files when opening.
        writable: Open the gallery for :meth:`add` (takes its writer lock).
        create_gallery: Create the gallery folder when it does not exist (implies writable).
        metric: A new gallery's search metric: ``"l2"`` ranks by the target distance d, ``"ip"`` by the cosine of the
            global embeddings (for models trained with a cosine loss); hits are explained the same way either way.
        fused: Search and explain with the fused Triton kernels on a float16 device copy of the gallery (torch backend
            only); None: when the torch backend runs on a GPU.
        refresh_s: A read-only gallery looks for entries another process appended (``attrimeter index``) before a
            search or explain at most this often, in seconds (None: only on :meth:`refresh`).

    Raises:
        attrimeter.export.manifest.ManifestError: A missing or tampered export.
        BackendError: No backend can run the export.
        GalleryError: A missing, corrupt or locked gallery, or one indexed with another model.
    """

    def __init__(self, export_dir: str | Path, gallery: str | Path | Gallery | None = None, *, backend: str = "auto",
                 device: str | None = None, threads: int | None = None, checkpoint: str | Path | None = None,
                 max_batch: int = 32, max_wait_ms: float = 2.0, queue_size: int = 1024,
                 queue_timeout_s: float = 1.0, decode_workers: int = 2, verify: bool = True, writable: bool = False,
                 create_gallery: bool = False, metric: str = "l2", fused: bool | None = None,
                 refresh_s: float | None = 1.0) -> None:
        from attrimeter.export.manifest import load_manifest

        self.export_dir = Path(export_dir)
        self.manifest = load_manifest(self.export_dir, verify=verify)
        attrs = self.manifest["attributes"]
        self.attributes: tuple[str, ...] = tuple(a["name"] for a in attrs)
        self.titles: tuple[str, ...] = tuple(a["title"] for a in attrs)
        self.meanings: tuple[tuple[str, str], ...] = tuple((a["meanings"][0], a["meanings"][1]) for a in attrs)
        self.image_size: tuple[int, int] = (int(self.manifest["image_size"][0]), int(self.manifest["image_size"][1]))
        self.model_id: str = self.manifest["source"]["sha256"]
        self.gallery: Gallery | None = None
        self.backend: Backend = open_backend(self.export_dir, self.manifest, backend, device=device, threads=threads,
                                             checkpoint=checkpoint)
        try:
            self._batcher = DynamicBatcher(self.backend.run, max_batch=min(max_batch, self.backend.max_batch),
                                           max_wait_s=max_wait_ms / 1000.0, queue_size=queue_size)
            self._queue_timeout = queue_timeout_s
            self._decoder = ThreadPoolExecutor(max(decode_workers, 1), thread_name_prefix="attrimeter-decode")
            self._lock = threading.Lock()
            self._append_lock = threading.Lock()
            self._refresh_s = refresh_s
            self._refreshed = time.monotonic()
            self._refresh_error: str | None = None
            self._corrupt: str | None = None  # corrupt stored rows met by a search: reported until restart
            self._latency = {op: _Latency() for op in ("embed", "search", "explain", "add")}
            self._errors = {op: 0 for op in self._latency}
            self._device: Any = None
            if gallery is not None:
                self.gallery = self._open_gallery(gallery, verify, writable or create_gallery, create_gallery, metric)
                self._device = self._device_search(fused)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ gallery ---

    def _open_gallery(self, gallery: str | Path | Gallery, verify: bool, writable: bool, create: bool,
                      metric: str) -> Gallery:
        if isinstance(gallery, Gallery):
            store = gallery
        else:
            path = Path(gallery)
            if create and not (path / "gallery.json").exists():
                channels, h, w = self.manifest["feature_map"]
                store = Gallery.create(path, dim=int(channels), attributes=self.attributes, aam_shape=(int(h), int(w)),
                                       model=self.model_id, metric=metric)
            else:
                store = Gallery.open(path, verify=verify, writable=writable)
        problem = None
        if store.model != self.model_id:
            problem = (f"{store.path} was indexed with another model (sha256 {store.model[:12]}…), this export is "
                       f"{self.model_id[:12]}…; index the images again with this export")
        elif tuple(store.attributes) != self.attributes or store.dim != int(self.manifest["feature_map"][0]):
            problem = f"{store.path}: its attributes/embedding size do not match the export's"
        if problem:
            if store is not gallery:  # opened here: release its lock and maps now
                store.close()
            raise GalleryError(problem)
        if not create:
            store.load_index()  # now rather than in the first search: steady latency from the first request
        return store

    def _device_search(self, fused: bool | None) -> Any:
        """Where the gallery is searched/explained on a GPU; None: FAISS + numpy on the CPU.

        * torch backend on a GPU (or ``fused=True``): :class:`~attrimeter.runtime.fused_search.FusedSearch`, the
          Triton ``attr_distance`` top-k kernel over a float16 device mirror (search and explanation);
        * TensorRT backend with AOT kernels in the export: FAISS searches, the export's explain kernel explains on a
          float16 device mirror through cuda-python (no torch at run time).

        Device mirrors hold the global rows in float16 too, so d carries float16 rounding there.
        """
        torch_device = getattr(self.backend, "torch_device", None)
        if fused is None:
            fused = torch_device is not None and torch_device.type == "cuda"
        if fused:
            if torch_device is None:
                raise BackendError("fused search runs the Triton kernels through torch: use backend='torch'")
            return FusedSearch(self._need_gallery(), str(torch_device))
        if self.backend.name != "tensorrt" or not (self.manifest.get("kernels") or {}).get("index"):
            return None
        from attrimeter.runtime.cuda_kernels import CudaExplainer

        explainer = CudaExplainer(self.export_dir, self.manifest, device=int(self.backend.device.split(":")[1]))
        gallery = self._need_gallery()
        for first, attr in gallery.attr_chunks(65536):
            ids = np.arange(first, first + len(attr))
            explainer.append_gallery(np.concatenate([gallery.embeddings(ids)[:, None].astype(np.float16), attr], 1))
        return explainer

    def _append(self, emb: Embeddings, meta: list[dict[str, Any]]) -> np.ndarray:
        """Append to the gallery, then to its device copy (explain uses the copy only for ids it already holds)."""
        gallery = self._need_gallery()
        with self._append_lock:
            ids = gallery.append(emb.embedding, emb.attr_embeddings, emb.probs, meta, aam=emb.aam)
            self._mirror(emb.stacked())
        return ids

    def _mirror(self, rows: np.ndarray) -> None:
        """Append rows to the device copy; the caller holds ``_append_lock``.

        A copy behind the store would explain the wrong rows, so one that fails is dropped: the CPU path takes over.
        """
        device = self._device
        if device is None:
            return
        try:
            device.append_gallery(rows)
        except Exception:
            logging.getLogger(__name__).exception("the device copy of the gallery failed; searching on the CPU")
            self._device = None
            device.close()

    def _check_open(self) -> None:
        if self.__dict__.get("_closed"):
            raise RuntimeError("the runtime is closed")

    def _need_gallery(self) -> Gallery:
        self._check_open()
        if self.gallery is None:
            raise GalleryError("no gallery is open (Runtime(export, gallery=...))")
        return self.gallery

    def refresh(self) -> int:
        """Pick up entries another process appended to the gallery (and copy them to the device copy, if any).

        Returns:
            The number of gallery entries now.

        Raises:
            GalleryError: No gallery, or a corrupt new segment (this handle keeps the entries it had).
        """
        gallery = self._need_gallery()
        with self._append_lock:
            self._refreshed = time.monotonic()  # also after a failure: retried after refresh_s, not on every call
            n = gallery.refresh()
            device = self._device
            if device is not None and len(device) < n:
                ids = np.arange(len(device), n)
                self._mirror(np.concatenate([gallery.embeddings(ids)[:, None], gallery.attr_embeddings(ids)], axis=1))
        return n

    def _maybe_refresh(self) -> None:
        gallery = self._need_gallery()
        if (self._refresh_s is not None and not gallery.writable
                and time.monotonic() - self._refreshed >= self._refresh_s):
            try:
                self.refresh()
            except GalleryError as e:  # keep serving what was published before; stats() shows the problem
                logging.getLogger(__name__).error("gallery refresh failed: %s", e)
                self._refresh_error = str(e)
            else:
                self._refresh_error = None

    # ------------------------------------------------------------------------------------------------ embed -----

    def _pixels(self, sources: list[ImageSource]) -> np.ndarray:
        self._check_open()
        size = self.image_size
        if len(sources) == 1:
            return load_image(sources[0], size, "images[0]")[None]
        futures = [self._decoder.submit(load_image, s, size, f"images[{i}]") for i, s in enumerate(sources)]
        return np.stack([f.result() for f in futures])

    def _infer(self, pixels: np.ndarray) -> Embeddings:
        out = self._batcher(to_input(pixels), timeout=self._queue_timeout)
        return self._embeddings(out)

    def _embeddings(self, out: Mapping[str, np.ndarray]) -> Embeddings:
        emb = Embeddings(embedding=out["embedding"], attr_embeddings=out["attr_embeddings"],
                         probs=_sigmoid(out["attr_logits"]), aam=out["aam"])
        finite = np.isfinite(emb.embedding).all(1) & np.isfinite(emb.attr_embeddings).all((1, 2))
        if not finite.all():
            raise InputError(f"the model gives NaN/inf embeddings for images {np.flatnonzero(~finite).tolist()}")
        return emb

    def _timed(self, op: str, start: float, ok: bool) -> None:
        with self._lock:
            self._latency[op].add(time.perf_counter() - start)
            self._errors[op] += not ok

    def embed(self, images: ImageSource | Sequence[ImageSource]) -> Embeddings:
        """Embed images.

        Args:
            images: One image or a sequence (paths, encoded bytes, uint8/float pixel arrays; see
                :func:`attrimeter.runtime.images.load_image`).

        Returns:
            :class:`Embeddings` of all images, in order.

        Raises:
            InputError: An unusable image (named by its index).
            OverloadedError: The request queue stayed full.
        """
        start, ok = time.perf_counter(), False
        try:
            result = self._infer(self._pixels(as_sources(images)))
            ok = True
            return result
        finally:
            self._timed("embed", start, ok)

    # ------------------------------------------------------------------------------------------------ search ----

    def _weights(self, weights: Mapping[str, float] | Sequence[float] | np.ndarray | None) -> np.ndarray | None:
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.attributes))
            if unknown:
                raise InputError(f"unknown attributes in weights: {unknown}; known: {list(self.attributes)}")
            full = np.ones(len(self.attributes), np.float64)  # attributes not named keep weight 1
            for name, value in weights.items():
                try:
                    full[self.attributes.index(name)] = float(value)
                except (TypeError, ValueError, OverflowError):
                    raise InputError(f"weight of {name!r} must be a number, got {value!r}") from None
            weights = full
        return check_weights(weights, len(self.attributes))

    def _explain(self, emb: Embeddings, pixels: np.ndarray | None, ids: np.ndarray, weights: np.ndarray | None,
                 overlays: int, dec: Decomposition | None = None) -> list[QueryResult]:
        gallery = self._need_gallery()
        q, k = len(ids), ids.shape[1]
        flat = ids.reshape(-1)
        device = self._device  # once: a failed append may drop it meanwhile
        stacked = emb.stacked() if dec is None else None
        if dec is not None:
            pass
        elif isinstance(device, FusedSearch) and k and ids.max() < len(device):
            dec = device.explain(stacked, ids, weights)
        elif device is not None and k and ids.max() < len(device):  # else: an add is being mirrored right now
            dec = Decomposition(**device.explain(stacked, ids, weights))
        else:  # in query chunks: the gathered rows stay bounded
            step = max(1, _EXPLAIN_CHUNK // max(k, 1))
            parts = []
            for s in range(0, q, step):
                part = ids[s:s + step].reshape(-1)
                rows = np.concatenate([gallery.embeddings(part)[:, None], gallery.attr_embeddings(part)], axis=1)
                queries = stacked[s:s + step]
                parts.append(explain_rows(queries, rows.reshape(len(queries), k, *rows.shape[1:]), weights))
            dec = Decomposition(*(np.concatenate(field) for field in zip(*parts, strict=True)))
        if weights is not None:  # re-rank the scan's winners by their exact scores
            order = np.lexsort((ids, dec.scores), axis=1)
            ids = np.take_along_axis(ids, order, 1)
            dec = Decomposition(*(np.take_along_axis(a, order if a.ndim == 2 else order[..., None], 1) for a in dec))
            flat = ids.reshape(-1)
        elif gallery.metric == "ip" and k:  # ranked by cosine, so that is the score: 1 − cos of the global embeddings
            g = gallery.embeddings(flat).reshape(q, k, -1).astype(np.float64)
            f = emb.embedding.astype(np.float64)
            cos = np.einsum("qc,qkc->qk", f, g) / np.maximum(
                np.linalg.norm(f, axis=1)[:, None] * np.linalg.norm(g, axis=2), 1e-30)
            dec = dec._replace(scores=(1.0 - cos).astype(np.float32))
        m = len(self.attributes)
        probs = gallery.probs(flat) if k else np.empty((0, m), np.float32)
        meta = gallery.meta(flat) if k else []
        g_aam = gallery.aam(flat) if overlays and k else None
        self._check_finite(ids, dec, probs.reshape(q, k, m), g_aam)
        hits = [{"id": int(i), "key": str(entry.get("key") or f"entry-{i}"), "path": entry.get("path"),
                 "camera": entry.get("camera")} for i, entry in zip(flat, meta, strict=True)]
        crops = [self._gallery_crop(hit["path"]) for hit in hits] if overlays and pixels is not None else None
        rows = explanations(dec, attributes=self.attributes, titles=self.titles, meanings=self.meanings,
                            query_probs=emb.probs, gallery_probs=probs, query_aam=emb.aam, query_images=pixels,
                            gallery_aam=g_aam, gallery_images=crops, hits=hits)
        return [QueryResult(matches=row, query_probs=emb.probs[i], attributes=self.attributes, meanings=self.meanings)
                for i, row in enumerate(rows)]

    def _check_finite(self, ids: np.ndarray, dec: Decomposition, probs: np.ndarray, g_aam: np.ndarray | None) -> None:
        """Stored rows with NaN/inf (files that match their checksums, but no model wrote them) are named, not served.

        Raises:
            CorruptGalleryError: Naming the entries; :meth:`stats` reports it from then on (``gallery_problem``).
        """
        ok = np.isfinite(dec.d) & np.isfinite(dec.d_k).all(-1) & np.isfinite(probs).all(-1)
        if g_aam is not None:
            ok &= np.isfinite(g_aam.reshape(ok.size, -1)).all(-1).reshape(ok.shape)
        if ok.all():
            return
        bad = np.unique(ids[~ok]).tolist()
        problem = (f"gallery entries {bad[:10]}{' …' if len(bad) > 10 else ''} hold NaN/inf values: the store is "
                   "corrupt (remove and index those images again)")
        self._corrupt = problem
        raise CorruptGalleryError(problem)

    def _gallery_crop(self, path: str | None) -> np.ndarray | None:
        """A hit's crop for its overlays, or None: its numbers stay valid when the image moved or was never known."""
        if not path:
            return None
        try:
            return load_image(path, self.image_size)
        except InputError:
            return None

    def _check_k(self, k: int, overlays: int, queries: int = 1, hits: int | None = None) -> None:
        """Check k and overlays; ``hits`` is how many matches come back per query (default: up to k)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be an integer >= 1, got {k!r}")
        m = len(self.attributes)
        if isinstance(overlays, bool) or not isinstance(overlays, (int, np.integer)) or not 0 <= overlays <= m:
            raise InputError(f"overlays must be an integer in [0, {m}], got {overlays!r}")
        if hits is None:
            hits = min(k, len(self.gallery)) if self.gallery is not None else k
        if queries * hits > MAX_HITS:
            raise InputError(f"{queries} queries x {hits} hits is more than {MAX_HITS} explained hits: ask for fewer")
        if queries * hits * overlays > MAX_OVERLAYS:
            raise InputError(f"{queries} queries x {k} hits x {overlays} overlays is more than {MAX_OVERLAYS} "
                             "pictures: ask for fewer hits or overlays")

    def _search(self, emb: Embeddings, pixels: np.ndarray | None, k: int, w: np.ndarray | None,
                overlays: int) -> list[QueryResult]:
        gallery = self._need_gallery()
        device = self._device
        if isinstance(device, FusedSearch) and (w is not None or gallery.metric == "l2"):  # the kernel ranks by L2
            ids, dec = device.search(emb.stacked(), int(k), w)
            return self._explain(emb, pixels, ids, w, min(int(overlays), len(self.attributes)), dec)
        if w is None:
            _, ids = gallery.search(emb.embedding, int(k))
        else:
            _, ids = weighted_scan(emb.attr_embeddings, gallery.attr_chunks(4096), w, int(k))
        return self._explain(emb, pixels, ids, w, min(int(overlays), len(self.attributes)))

    def search(self, images: ImageSource | Sequence[ImageSource], k: int = 10,
               weights: Mapping[str, float] | Sequence[float] | None = None, overlays: int = 0) -> list[QueryResult]:
        """The k nearest gallery entries of each query image, explained.

        Args:
            images: One query image or several.
            k: Hits per query (fewer when the gallery is smaller).
            weights: Attribute weights for an attribute-weighted search, ranking by ``Σ_k w_k d_k`` instead of d:
                a mapping name → weight (unnamed attributes keep 1; e.g. ``{"upblack": 0, ...}`` ignores upper-body
                black) or M numbers. None ranks by the target distance d.
            overlays: Attention-map overlays for this many top attributes per hit (at most :data:`MAX_OVERLAYS`
                pictures per call): the hits then carry their crops and maps, which
                :meth:`~attrimeter.explanation.Explanation.overlays`, ``to_dict(overlays=...)`` and ``figure`` draw.

        Returns:
            One :class:`~attrimeter.explanation.QueryResult` per query image: its matches are
            explanations with their hit fields set.

        Raises:
            InputError: Bad image, k or weights.
            GalleryError: No gallery is open.
            OverloadedError: The request queue stayed full.
        """
        start, ok = time.perf_counter(), False
        try:
            self._maybe_refresh()
            sources = as_sources(images)
            self._check_k(k, overlays, len(sources))
            w = self._weights(weights)
            pixels = self._pixels(sources)
            result = self._search(self._infer(pixels), pixels, k, w, overlays)
            ok = True
            return result
        finally:
            self._timed("search", start, ok)

    def search_embeddings(self, embeddings: Embeddings, k: int = 10,
                          weights: Mapping[str, float] | Sequence[float] | None = None) -> list[QueryResult]:
        """Like :meth:`search` for queries already embedded with :meth:`embed` (no overlays: they need pixels).

        Args:
            embeddings: The queries' :class:`Embeddings`.
            k: Hits per query.
            weights: See :meth:`search`.

        Returns:
            One :class:`QueryResult` per query.
        """
        start, ok = time.perf_counter(), False
        try:
            self._maybe_refresh()
            self._check_k(k, 0)
            result = self._search(embeddings, None, k, self._weights(weights), 0)
            ok = True
            return result
        finally:
            self._timed("search", start, ok)

    def explain(self, image: ImageSource, ids: Sequence[int], overlays: int = 0) -> QueryResult:
        """Explain one query image against chosen gallery entries.

        Args:
            image: The query image.
            ids: Gallery ids (matches come back in this order).
            overlays: Attention-map overlays for this many top attributes per entry (see :meth:`search`).

        Returns:
            A :class:`QueryResult` whose matches follow ``ids``.

        Raises:
            InputError: A bad image or ids that are not integers.
            UnknownIdError: An id the gallery does not hold.
            GalleryError: No gallery is open.
        """
        start, ok = time.perf_counter(), False
        try:
            self._maybe_refresh()
            gallery = self._need_gallery()
            try:
                id_array = np.asarray(ids)
                if id_array.ndim != 1 or len(id_array) == 0 or not np.issubdtype(id_array.dtype, np.integer):
                    raise TypeError
            except (TypeError, ValueError):
                raise InputError(f"ids must be a non-empty list of integers, got {ids!r}") from None
            self._check_k(len(id_array), overlays, hits=len(id_array))
            gallery.meta(id_array)  # raises UnknownIdError before any work
            pixels = self._pixels([image])
            emb = self._infer(pixels)
            result = self._explain(emb, pixels, id_array.astype(np.int64)[None], None, overlays)[0]
            ok = True
            return result
        finally:
            self._timed("explain", start, ok)

    # ------------------------------------------------------------------------------------------------ add -------

    def add(self, images: ImageSource | Sequence[ImageSource], keys: Sequence[str] | None = None,
            cameras: Sequence[int | None] | None = None, paths: Sequence[str | None] | None = None,
            extra: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """Embed images and append them to the gallery as one crash-safe segment.

        Args:
            images: The images.
            keys: A name per image, at most :data:`MAX_KEY_CHARS` characters (default: its path, else
                ``"entry-<id>"``).
            cameras: A camera id per image (or None).
            paths: An image file per image, kept for overlays (default: the source when it is a path).
            extra: More JSON-able metadata per image (e.g. ``{"pid": 12}``).

        Returns:
            The new gallery ids.

        Raises:
            InputError: A bad image or metadata of the wrong length; nothing is added.
            GalleryError: No writable gallery.
        """
        start, ok = time.perf_counter(), False
        try:
            self._need_gallery()
            sources = as_sources(images)
            n = len(sources)
            for name, values in (("keys", keys), ("cameras", cameras), ("paths", paths), ("extra", extra)):
                if values is not None and len(values) != n:
                    raise InputError(f"{name} has {len(values)} entries for {n} images")
            for i, key in enumerate(keys or ()):
                if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
                    raise InputError(f"keys[{i}] must be a string of at most {MAX_KEY_CHARS} characters")
            emb = self._infer(self._pixels(sources))
            meta = []
            for i, src in enumerate(sources):
                path = paths[i] if paths is not None else (str(src) if isinstance(src, (str, Path)) else None)
                entry: dict[str, Any] = dict(extra[i]) if extra is not None else {}
                entry.update(key=keys[i] if keys is not None else path, path=path,
                             camera=None if cameras is None or cameras[i] is None else int(cameras[i]))
                meta.append(entry)
            ids = self._append(emb, meta)
            ok = True
            return ids
        finally:
            self._timed("add", start, ok)

    def index_folder(self, folder: str | Path, segment: int = 4096, progress: bool = True) -> IndexReport:
        """Add every image under a folder (sorted, recursive) to the gallery, one crash-safe segment at a time.

        Images already in the gallery (same resolved path) are skipped, so an interrupted run resumes; unreadable
        images are skipped and reported, so one bad file never blocks the rest. Identity and camera (``c1`` → 1) come
        from Market-1501/DukeMTMC file names that follow the pattern; the key is the path relative to ``folder``.

        Args:
            folder: Image folder.
            segment: Images per appended segment.
            progress: Show a progress bar.

        Returns:
            How many images were added, and the unreadable ones with the reason.

        Raises:
            InputError: No images in the folder.
            GalleryError: No writable gallery.
        """
        from attrimeter.data.formats import DataFormatError, parse_image_name

        gallery = self._need_gallery()
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        known = {m.get("path") for m in gallery.meta(np.arange(len(gallery)))} if len(gallery) else set()
        todo = [p for p in files if str(p.resolve()) not in known]
        bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress)
        size, step = self.image_size, self._batcher.max_batch
        added, skipped = 0, []

        def decode(path: Path) -> np.ndarray | None:
            try:
                return load_image(path, size, str(path))
            except Exception as e:  # whatever is wrong with one file, the others still get indexed
                skipped.append((str(path), str(e) or type(e).__name__))
                return None

        for s in range(0, len(todo), segment):
            pending: list[tuple[list[Path], list[Future[dict[str, np.ndarray]]]]] = []
            done: list[tuple[list[Path], dict[str, np.ndarray]]] = []
            chunk = todo[s:s + segment]
            for b in range(0, len(chunk), step):  # decode the next batch while the engine runs this one
                decoded = list(self._decoder.map(decode, chunk[b:b + step]))
                good = [(p, x) for p, x in zip(chunk[b:b + step], decoded, strict=True) if x is not None]
                bar.update(len(decoded))
                if good:
                    pending.append(([p for p, _ in good], self._batcher.submit(to_input(np.stack([x for _, x in good])),
                                                                               timeout=None)))
                while len(pending) > 2:  # bounded: at most three batches of pixels in flight
                    paths, futures = pending.pop(0)
                    done.append((paths, futures[0].result()))
            done += [(paths, futures[0].result()) for paths, futures in pending]
            if not done:
                continue
            paths = [p for ps, _ in done for p in ps]
            out = {k: np.concatenate([o[k] for _, o in done]) for k in done[0][1]}
            finite = np.isfinite(out["embedding"]).all(1) & np.isfinite(out["attr_embeddings"]).all((1, 2))
            skipped += [(str(p), "the model gives NaN/inf embeddings") for p, ok in zip(paths, finite, strict=True)
                        if not ok]
            if not finite.all():
                paths = [p for p, ok in zip(paths, finite, strict=True) if ok]
                out = {k: v[finite] for k, v in out.items()}
            if not paths:
                continue
            emb = self._embeddings(out)
            meta = []
            for p in paths:
                entry: dict[str, Any] = {"key": p.relative_to(folder).as_posix(), "path": str(p.resolve()),
                                         "camera": None}
                for style in ("market1501", "dukemtmc"):
                    try:
                        pid, cam = parse_image_name(p, style)
                    except DataFormatError:
                        continue
                    entry.update(pid=pid, camera=cam + 1)  # as the file name writes it: c1 → 1
                    break
                meta.append(entry)
            self._append(emb, meta)
            added += len(paths)
        bar.close()
        return IndexReport(added=added, skipped=skipped)

    # ------------------------------------------------------------------------------------------------ misc ------

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: backend, gallery size, queue depth, batches, per-operation latency and errors.

        ``gallery_refresh_error``: why entries another process appended could not be read (the old ones stay in use);
        ``gallery_problem``: corrupt stored rows a search met. Either makes a server's ``/health`` say degraded.
        """
        self._check_open()
        b = self._batcher.stats
        with self._lock:
            latency = {op: h.snapshot() for op, h in self._latency.items()}
            errors = dict(self._errors)
        return {"backend": self.backend.name, "device": self.backend.device,
                "gallery_size": None if self.gallery is None else len(self.gallery),
                "queue_depth": self._batcher.queue_depth, "requests": b.requests, "images": b.rows,
                "batches": b.batches, "failed_batches": b.failed_batches, "rejected": b.rejected,
                "busy_seconds": b.busy_s, "batch_sizes": dict(b.batch_sizes), "latency": latency, "errors": errors,
                "queued_images": self._batcher.queued_rows, "gallery_refresh_error": self._refresh_error,
                "gallery_problem": self._corrupt}

    def close(self) -> None:
        """Finish queued requests, then release the engine, the device copy and the gallery (also one passed in).

        Idempotent. Afterwards every method raises ``RuntimeError("... closed ...")``.
        """
        if self.__dict__.get("_closed"):
            return
        self._closed = True
        batcher, decoder = self.__dict__.get("_batcher"), self.__dict__.get("_decoder")
        device, self._device = self.__dict__.get("_device"), None
        try:
            if batcher is not None:
                batcher.close()
            if decoder is not None:
                decoder.shutdown(wait=True)
            if device is not None:
                device.close()
        finally:
            try:
                if self.gallery is not None:
                    self.gallery.close()
            finally:
                if "backend" in self.__dict__:
                    self.backend.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
