"""``Runtime(export_dir, gallery)``: embed, search and explain with an exported model, no torch needed.

One object ties an export (any backend), a dynamic batcher and an optional gallery store together
(docs/architecture.md §6)::

    with Runtime("export/", "gallery/", RuntimeConfig(threads=2)) as rt:
        for result in rt.search(["query.jpg"], k=10, weights={"upblack": 0}):
            for m in result.matches:
                print(m.to_text())  # rank, key, d, the largest shares, the predictions that differ

Search ranks the gallery by the target distance d with exact FAISS search (or, with attribute weights, by
``Σ_k w_k d_k`` with an exact scan of the attribute store), then explains each hit: per-attribute distances d_k, shares
p_k = d_k / Σ_j d_j, contributions c_k = p_k·d (they sum to d), d̂, and the predicted attributes on which query and hit
differ. All methods are thread-safe: concurrent callers' images are batched together on one inference thread.

The parts, one job each: :class:`~attrimeter.runtime.config.RuntimeConfig` (how it runs),
:class:`~attrimeter.runtime.embedder.Embedder` (decode pool, batcher, backend), :mod:`~attrimeter.runtime.gallery_open`
(opening a gallery for this export's model), :mod:`~attrimeter.runtime.device_index` (the gallery's GPU copy),
:class:`~attrimeter.runtime.live_gallery.LiveGallery` (keeping store and copy current) and
:mod:`~attrimeter.runtime.indexing` (bulk indexing). Latency and error counts are the HTTP server's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.artefact.manifest import Manifest, load_manifest
from attrimeter.explanation import QueryResult, explanations, predictions
from attrimeter.runtime.backends import Backend, BackendError
from attrimeter.runtime.config import RuntimeConfig
from attrimeter.runtime.decompose import Decomposition, check_weights, explain_rows
from attrimeter.runtime.device_index import DeviceIndex, open_device_index
from attrimeter.runtime.distributed.hits import RowSet
from attrimeter.runtime.distributed.sharded import ShardedGallery
from attrimeter.runtime.embedder import Embedder
from attrimeter.runtime.errors import CorruptGalleryError, GalleryError, InputError
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.gallery_index import set_search_threads
from attrimeter.runtime.gallery_open import open_gallery
from attrimeter.runtime.images import ImageSource, as_sources, load_image
from attrimeter.runtime.indexing import IndexReport, index_folder
from attrimeter.runtime.live_gallery import LiveGallery

__all__ = ["MAX_HITS", "MAX_KEY_CHARS", "MAX_OVERLAYS", "Embeddings", "IndexReport", "Runtime", "RuntimeConfig"]

# Most overlay pictures one call may ask for (queries × hits × attributes): each is a full-size RGB crop.
MAX_OVERLAYS = 256
# Most explained hits one call may ask for (queries × k): each carries M+1 embeddings and M numbers per field.
MAX_HITS = 10_000
# Longest key :meth:`Runtime.add` stores: keys come back with every hit, so megabyte keys would make a small search
# answer megabytes.
MAX_KEY_CHARS = 1024
# Hits explained per step: bounds the gathered float32 rows (hits × (M+1) × C) whatever the request.
_EXPLAIN_CHUNK = 1024


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


class Runtime:
    """An export, a backend, a dynamic batcher and an optional gallery: embed, search, explain, add.

    Args:
        export_dir: The export folder (``attrimeter export``); its manifest and file hashes are checked.
        gallery: A gallery folder (``attrimeter index``), a sharded gallery's folder or ``shards.json``
            (``attrimeter index --ray``; opened in this process), an open :class:`Gallery` or
            :class:`~attrimeter.runtime.distributed.sharded.ShardedGallery` (e.g. on Ray), or None.
        config: How it runs (backend, batching, gallery opening, device search); default :class:`RuntimeConfig`.

    Raises:
        attrimeter.artefact.manifest.ManifestError: A missing or tampered export.
        BackendError: No backend can run the export.
        GalleryError: A missing, corrupt or locked gallery, or one indexed with another model.
    """

    def __init__(self, export_dir: str | Path, gallery: str | Path | Gallery | ShardedGallery | None = None,
                 config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        set_search_threads(self.config.search_threads)
        self.export_dir = Path(export_dir)
        self.manifest: Manifest = load_manifest(self.export_dir, verify=self.config.verify)
        self.attributes: tuple[str, ...] = self.manifest.attribute_names
        self.titles: tuple[str, ...] = tuple(a.title for a in self.manifest.attributes)
        self.meanings: tuple[tuple[str, str], ...] = tuple(a.meanings for a in self.manifest.attributes)
        self.image_size: tuple[int, int] = self.manifest.image_size
        self.model_id: str = self.manifest.model_id
        self.gallery: Gallery | ShardedGallery | None = None
        self._live: LiveGallery | None = None
        self._corrupt: str | None = None  # corrupt stored rows met by a search: reported until restart
        self._embedder = Embedder(self.export_dir, self.manifest, self.config)
        try:
            if gallery is not None:
                self.gallery = open_gallery(gallery, self.manifest, self.config)
                device = self._device_index()
                self._live = LiveGallery(self.gallery, device, self.config.refresh_s)
        except BaseException:
            self.close()
            raise

    def _device_index(self) -> DeviceIndex | None:
        if not isinstance(self.gallery, ShardedGallery):
            return open_device_index(self.backend, self.gallery, self.export_dir, self.manifest, self.config.fused)
        if self.config.fused:  # each shard searches where it lives: there is no whole gallery to copy to a device
            raise BackendError("fused search needs the whole gallery on one device; not with a sharded gallery")
        return None

    @property
    def backend(self) -> Backend:
        """The inference backend (its ``name`` and ``device`` say what runs the model)."""
        return self._embedder.backend

    @property
    def _device(self) -> DeviceIndex | None:
        """The gallery's device copy, or None (read once per request: a failed append may drop it meanwhile)."""
        return None if self._live is None else self._live.device

    # ------------------------------------------------------------------------------------------------ gallery ---

    def _append(self, emb: Embeddings, meta: list[dict[str, Any]]) -> np.ndarray:
        """Append to the gallery, then to its device copy (explain uses the copy only for ids it already holds)."""
        return self._need_live().append(emb.embedding, emb.attr_embeddings, emb.probs, meta, emb.aam)

    def _check_open(self) -> None:
        if self.__dict__.get("_closed"):
            raise RuntimeError("the runtime is closed")

    def _need_live(self) -> LiveGallery:
        self._check_open()
        if self._live is None:
            raise GalleryError("no gallery is open (Runtime(export, gallery=...))")
        return self._live

    def _need_gallery(self) -> Gallery | ShardedGallery:
        return self._need_live().store

    def refresh(self) -> int:
        """Pick up entries another process appended to the gallery (and copy them to the device copy, if any).

        Returns:
            The number of gallery entries now.

        Raises:
            GalleryError: No gallery, or a corrupt new segment (this handle keeps the entries it had).
        """
        return self._need_live().refresh()

    def _maybe_refresh(self) -> None:
        self._need_live().maybe_refresh()

    # ------------------------------------------------------------------------------------------------ embed -----

    def _pixels(self, sources: list[ImageSource]) -> np.ndarray:
        self._check_open()
        return self._embedder.pixels(sources)

    def _infer(self, pixels: np.ndarray) -> Embeddings:
        return self._embeddings(self._embedder.run(pixels))

    def _embeddings(self, out: Mapping[str, np.ndarray]) -> Embeddings:
        emb = Embeddings(embedding=out["embedding"], attr_embeddings=out["attr_embeddings"],
                         probs=_sigmoid(out["attr_logits"]), aam=out["aam"])
        finite = np.isfinite(emb.embedding).all(1) & np.isfinite(emb.attr_embeddings).all((1, 2))
        if not finite.all():
            raise InputError(f"the model gives NaN/inf embeddings for images {np.flatnonzero(~finite).tolist()}")
        return emb

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
        return self._infer(self._pixels(as_sources(images)))

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
                 overlays: int, dec: Decomposition | None = None, stored: RowSet | None = None,
                 missing: tuple[str, ...] = ()) -> list[QueryResult]:
        """Explain hits ``ids`` [Q, k]; their stored rows come from ``stored`` (a sharded search's) or the gallery."""
        gallery: Gallery | ShardedGallery | RowSet = self._need_gallery() if stored is None else stored
        q, k = len(ids), ids.shape[1]
        flat = ids.reshape(-1)
        device = self._device  # once: a failed append may drop it meanwhile
        stacked = emb.stacked() if dec is None else None
        if dec is not None:
            pass
        elif device is not None and k and ids.max() < len(device):  # else: an add is being mirrored right now
            dec = device.explain(stacked, ids, weights)
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
        g_aam, hit_pixels = self._hit_maps(gallery, flat, meta) if overlays and k else (None, None)
        self._check_finite(ids, dec, probs.reshape(q, k, m), g_aam)
        hits = [{"id": int(i), "key": str(entry.get("key") or f"entry-{i}"), "path": entry.get("path"),
                 "camera": entry.get("camera")} for i, entry in zip(flat, meta, strict=True)]
        crops = None
        if overlays and pixels is not None:  # the crops the maps were recomputed from, else read now
            crops = hit_pixels if hit_pixels is not None else [self._gallery_crop(hit["path"]) for hit in hits]
        rows = explanations(dec, attributes=self.attributes, titles=self.titles, meanings=self.meanings,
                            query_probs=emb.probs, gallery_probs=probs, query_aam=emb.aam, query_images=pixels,
                            gallery_aam=g_aam, gallery_images=crops, hits=hits)
        return [QueryResult(matches=row, query_probs=emb.probs[i], attributes=self.attributes, meanings=self.meanings,
                            missing_shards=missing) for i, row in enumerate(rows)]

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

    def _hit_maps(self, gallery: Gallery | ShardedGallery | RowSet, ids: np.ndarray,
                  meta: list[dict[str, Any]]) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
        """The hits' maps, as stored or recomputed from their crops, and the crops decoded for that (or None).

        The overlays draw on those crops: they are not read a second time.

        A gallery stored without maps (e.g. ``compact-nomaps``, docs/architecture.md §10) keeps each crop's path and
        sha256 in its metadata; the crop is embedded again only for the hits drawn as overlays.

        Raises:
            GalleryError: A crop that is missing or changed since it was indexed (its maps would be another image's).
        """
        stored = gallery.aam(ids)
        if stored is not None or not all(entry.get("sha256") and entry.get("path") for entry in meta):
            return stored, None
        pixels = []
        for entry in meta:
            try:
                raw = Path(entry["path"]).read_bytes()
            except OSError as e:
                raise GalleryError(f"gallery entry {entry['id']}: its crop {entry['path']} is unreadable ({e}); its "
                                   "maps are not stored and cannot be recomputed") from e
            if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
                raise GalleryError(f"gallery entry {entry['id']}: its crop {entry['path']} changed since it was "
                                   "indexed (sha256 differs); its maps are not stored and cannot be recomputed: index "
                                   "it again")
            pixels.append(load_image(raw, self.image_size, str(entry["path"])))
        return self._infer(np.stack(pixels)).aam, pixels

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
        if isinstance(gallery, ShardedGallery):  # one fan-out: the shards' top-k come back with their rows
            drawn = min(int(overlays), len(self.attributes))
            hits = (gallery.search_rows(emb.embedding, int(k), aam=drawn > 0) if w is None
                    else gallery.weighted_search_rows(emb.attr_embeddings, w, int(k), aam=drawn > 0))
            return self._explain(emb, pixels, hits.ids, w, drawn, stored=hits.rows, missing=hits.missing)
        if device is not None and device.can_rank(w is not None, gallery.metric):
            ids, dec = device.search(emb.stacked(), int(k), w)
            return self._explain(emb, pixels, ids, w, min(int(overlays), len(self.attributes)), dec)
        if w is None:
            _, ids = gallery.search(emb.embedding, int(k))
        else:
            _, ids = gallery.weighted_search(emb.attr_embeddings, w, int(k))
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
        self._maybe_refresh()
        sources = as_sources(images)
        self._check_k(k, overlays, len(sources))
        w = self._weights(weights)
        pixels = self._pixels(sources)
        return self._search(self._infer(pixels), pixels, k, w, overlays)

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
        self._maybe_refresh()
        self._check_k(k, 0)
        return self._search(embeddings, None, k, self._weights(weights), 0)

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
        return self._explain(emb, pixels, id_array.astype(np.int64)[None], None, overlays)[0]

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
            paths: An image file per image, kept for overlays (default: the source when it is a path). With an
                encoded source (a file or bytes), the sha256 of the bytes embedded is kept too: a gallery that drops
                its maps recomputes a hit's maps from that file only while it still holds those bytes.
            extra: More JSON-able metadata per image (e.g. ``{"pid": 12}``; a ``sha256`` of its own is dropped: only
                the bytes embedded here are vouched for).

        Returns:
            The new gallery ids.

        Raises:
            InputError: A bad image or metadata of the wrong length; nothing is added.
            GalleryError: No writable gallery.
        """
        self._need_gallery()
        sources = as_sources(images)
        n = len(sources)
        for name, values in (("keys", keys), ("cameras", cameras), ("paths", paths), ("extra", extra)):
            if values is not None and len(values) != n:
                raise InputError(f"{name} has {len(values)} entries for {n} images")
        for i, key in enumerate(keys or ()):
            if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
                raise InputError(f"keys[{i}] must be a string of at most {MAX_KEY_CHARS} characters")
        given = list(sources)
        digests: list[str | None] = [None] * n
        for i, src in enumerate(given):  # a file is read once: its hash is of exactly the bytes embedded
            if isinstance(src, (str, Path)):
                try:
                    sources[i] = Path(src).read_bytes()
                except OSError as e:
                    raise InputError(f"images[{i}] ({src}): cannot read the image ({e.strerror or e})") from e
            if isinstance(sources[i], (bytes, bytearray, memoryview)):
                digests[i] = hashlib.sha256(sources[i]).hexdigest()
        emb = self._infer(self._pixels(sources))
        meta = []
        for i, src in enumerate(given):
            path = paths[i] if paths is not None else (str(src) if isinstance(src, (str, Path)) else None)
            entry: dict[str, Any] = dict(extra[i]) if extra is not None else {}
            entry.pop("sha256", None)
            entry.update(key=keys[i] if keys is not None else path, path=path,
                         camera=None if cameras is None or cameras[i] is None else int(cameras[i]))
            if path is not None and digests[i] is not None:
                entry["sha256"] = digests[i]
            meta.append(entry)
        return self._append(emb, meta)

    def index_folder(self, folder: str | Path, segment: int = 4096, progress: bool = True) -> IndexReport:
        """Add every image under a folder (sorted, recursive) to the gallery, one crash-safe segment at a time.

        Images already in the gallery (same resolved path) are skipped, so an interrupted run resumes; unreadable
        images are skipped and reported (see :func:`attrimeter.runtime.indexing.index_folder`).

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
        gallery = self._need_gallery()
        return index_folder(folder, gallery, self._embedder,
                            lambda out, meta: self._append(self._embeddings(out), meta), segment, progress)

    # ------------------------------------------------------------------------------------------------ misc ------

    def stats(self) -> dict[str, Any]:
        """What a monitor wants to know now: backend, gallery size, the engine's queue and counters, and problems.

        ``gallery_refresh_error``: why entries another process appended could not be read (the old ones stay in use);
        ``gallery_problem``: corrupt stored rows a search met; ``gallery_missing_shards``: the shards of a sharded
        gallery that did not answer the last call to them. Any of them makes a server's ``/health`` say degraded.
        Latency and error counts are the HTTP server's (:class:`attrimeter.runtime.metrics.ServerMetrics`).
        """
        self._check_open()
        return {**self._embedder.stats(), "gallery_size": None if self.gallery is None else len(self.gallery),
                "gallery_index": None if self.gallery is None else self.gallery.index_kind,
                "gallery_refresh_error": None if self._live is None else self._live.refresh_error,
                "gallery_problem": self._corrupt,
                "gallery_missing_shards": list(getattr(self.gallery, "missing_shards", ()))}

    def close(self) -> None:
        """Finish queued requests, then release the engine, the device copy and the gallery (also one passed in).

        Idempotent. Afterwards every method raises ``RuntimeError("... closed ...")``.
        """
        if self.__dict__.get("_closed"):
            return
        self._closed = True
        try:
            if "_embedder" in self.__dict__:
                self._embedder.close()
        finally:
            if self._live is not None:
                self._live.close()
            elif self.gallery is not None:  # opened, but failed before its device copy was made
                self.gallery.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
