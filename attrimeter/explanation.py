"""The explanation of a distance: one result type for the PyTorch API and the torch-free runtime.

:class:`Explanation` is what :meth:`attrimeter.explain.Interpreter.explain` returns for a pair of crops and what
:meth:`attrimeter.runtime.Runtime.search` returns for each gallery hit (then with the hit's id, key, rank and score):
the target distance d, its decomposition d_k, shares p_k = d_k / Σ_j d_j and contributions c_k = p_k · d (they sum
to d), and the attributes predicted for both persons (docs/architecture.md §3). It turns itself into JSON
(:meth:`Explanation.to_dict`, the HTTP API's ``MatchBody``), terminal text (:meth:`Explanation.to_text`) and pictures
(:meth:`Explanation.overlays`, :meth:`Explanation.figure`). :class:`QueryResult` groups the explained hits of one query.

Needs numpy only (matplotlib and Pillow are imported by the picture methods), so the runtime uses it without torch.
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from attrimeter.runtime.decompose import Decomposition

__all__ = ["HIT_FIELDS", "AttributeShare", "Difference", "Explanation", "Overlay", "QueryResult", "explanations",
           "predictions", "printable"]

# Hit fields (gallery id, key, image path, camera) every hit passed to :func:`explanations` carries.
HIT_FIELDS = ("id", "key", "path", "camera")


class AttributeShare(NamedTuple):
    """One attribute's part of a distance.

    Attributes:
        name: Attribute name (schema key, e.g. ``"upblack"``).
        title: Its human-readable name.
        d_k: Per-attribute distance.
        share: ``p_k = d_k / Σ_j d_j``.
        contribution: ``c_k = p_k · d``.
    """

    name: str
    title: str
    d_k: float
    share: float
    contribution: float


class Difference(NamedTuple):
    """A predicted attribute on which the two persons differ.

    Attributes:
        name: Attribute name.
        title: Its human-readable name.
        query: The meaning of the query's predicted value.
        gallery: The meaning of the gallery image's predicted value.
    """

    name: str
    title: str
    query: str
    gallery: str


class Overlay(NamedTuple):
    """One attribute's attention maps drawn over both crops (uint8 ``[H, W, 3]``), on a common scale.

    Attributes:
        attribute: Attribute name.
        query: Over the query crop.
        gallery: Over the gallery crop; None when the explanation holds no gallery crop or maps.
    """

    attribute: str
    query: np.ndarray
    gallery: np.ndarray | None


def _labels(probs: np.ndarray) -> list[int]:
    """The predicted label (0 or 1) of each probability of label 1."""
    return (np.asarray(probs) > 0.5).astype(np.int64).tolist()


def predictions(attributes: Sequence[str], meanings: Sequence[tuple[str, str]],
                probs: np.ndarray) -> dict[str, dict[str, Any]]:
    """JSON-ready predicted attributes: ``{name: {"value": meaning of the predicted label, "prob": P(label 1)}}``.

    Args:
        attributes: Attribute names ``[M]``.
        meanings: The meaning of label 0 and 1 of each attribute.
        probs: Predicted probability of label 1 ``[M]``.

    Returns:
        One entry per attribute, in the given order.
    """
    return {a: {"value": m[label], "prob": p} for a, m, label, p in
            zip(attributes, meanings, _labels(probs), np.asarray(probs, dtype=np.float64).tolist(), strict=True)}


def printable(text: str) -> str:
    r"""``text`` safe for a terminal: control characters, lone surrogates and the like as escapes (``\x1b``).

    Gallery keys are user input (and file names need not be valid UTF-8), so every line of :meth:`Explanation.to_text`
    goes through this.
    """
    return "".join(c if c.isprintable() and unicodedata.category(c) != "Cs" else repr(c)[1:-1] for c in text)


def _png_base64(image: np.ndarray) -> str:
    from attrimeter.viz import to_png

    return base64.b64encode(to_png(image)).decode("ascii")


@dataclass(frozen=True, eq=False)  # compared by identity: numpy fields have no single truth value
class Explanation:
    """The decomposition of one query–gallery distance.

    The hit fields (``id`` to ``score``) are set for a gallery hit of the runtime and None for a pair explained with
    :class:`~attrimeter.explain.Interpreter`. Crops and attention maps are optional: the runtime attaches the gallery
    side only when asked for overlays (they are read from the store and the image file), and has no query crop for
    queries given as embeddings; the picture methods say what is missing.

    Attributes:
        d: Target distance ``‖f(q) − f(g)‖``.
        d_hat: Decomposed distance ``(1/M) Σ_k d_k``.
        d_k: Per-attribute distances ``[M]``.
        shares: ``p_k = d_k / Σ_j d_j`` ``[M]`` (sum 1).
        attributes: Attribute names ``[M]`` (schema keys, e.g. ``"upblack"``).
        titles: Human-readable attribute names ``[M]``.
        meanings: The meaning of label 0 and 1 of each attribute.
        query_probs: Predicted probability of label 1 (the schema's code 2) for the query ``[M]``.
        gallery_probs: Likewise for the gallery image.
        query_aam: The query's attention maps ``[M, h, w]``, or None.
        gallery_aam: The gallery image's attention maps ``[M, h, w]``, or None.
        query_image: The query crop as the model saw it, uint8 ``[H, W, 3]``, or None.
        gallery_image: Likewise for the gallery crop (None when its file is unknown or unreadable).
        id: Gallery id of a hit.
        key: The hit's key (its image path relative to the indexed folder, or what the caller gave).
        path: The hit's image file when known.
        camera: The hit's camera id when known.
        rank: 1 for the best hit.
        score: The ranking score: d; ``Σ_k w_k d_k`` in a weighted search; ``1 − cos`` of the global embeddings in
            an ``"ip"`` (cosine) gallery.

    Raises:
        ValueError: When the per-attribute arrays and names do not all have M entries.
    """

    d: float
    d_hat: float
    d_k: np.ndarray
    shares: np.ndarray
    attributes: tuple[str, ...]
    titles: tuple[str, ...]
    meanings: tuple[tuple[str, str], ...]
    query_probs: np.ndarray
    gallery_probs: np.ndarray
    query_aam: np.ndarray | None = None
    gallery_aam: np.ndarray | None = None
    query_image: np.ndarray | None = None
    gallery_image: np.ndarray | None = None
    id: int | None = None
    key: str | None = None
    path: str | None = None
    camera: int | None = None
    rank: int | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        m = len(self.attributes)
        sizes = {"titles": len(self.titles), "meanings": len(self.meanings), "d_k": np.shape(self.d_k),
                 "shares": np.shape(self.shares), "query_probs": np.shape(self.query_probs),
                 "gallery_probs": np.shape(self.gallery_probs)}
        bad = {name: size for name, size in sizes.items() if size not in (m, (m,))}
        if bad:
            raise ValueError(f"an explanation of {m} attributes got {bad} entries")

    @property
    def contributions(self) -> np.ndarray:
        """``c_k = p_k · d`` ``[M]``: they sum to d."""
        return self.shares * np.float32(self.d)

    def _order(self) -> np.ndarray:
        """Attribute indices by decreasing contribution (ties in schema order)."""
        return np.argsort(-self.contributions, kind="stable")

    def top(self, n: int = 3) -> list[AttributeShare]:
        """The attributes contributing most.

        Args:
            n: How many (``len(attributes)`` for all of them).

        Returns:
            At most n :class:`AttributeShare`, by decreasing contribution.
        """
        order = self._order()[:n]
        # numpy → Python floats in bulk: per-element conversion would dominate a large search's answer
        return [AttributeShare(self.attributes[i], self.titles[i], dk, p, c) for i, dk, p, c in
                zip(order.tolist(), self.d_k[order].tolist(), self.shares[order].tolist(),
                    self.contributions[order].tolist(), strict=True)]

    def predicted(self, which: str = "query") -> dict[str, str]:
        """The predicted value of every attribute, in words.

        Args:
            which: ``"query"`` or ``"gallery"``.

        Returns:
            Attribute name -> meaning of the predicted value (e.g. ``{"up": "short sleeve", ...}``).

        Raises:
            ValueError: If ``which`` is neither.
        """
        if which not in ("query", "gallery"):
            raise ValueError(f"which must be 'query' or 'gallery', got {which!r}")
        probs = self.query_probs if which == "query" else self.gallery_probs
        return {a: m[label] for a, m, label in zip(self.attributes, self.meanings, _labels(probs), strict=True)}

    def differing(self) -> list[Difference]:
        """Attributes predicted differently for the two persons, by decreasing contribution.

        Returns:
            One :class:`Difference` per such attribute.
        """
        q, g = _labels(self.query_probs), _labels(self.gallery_probs)
        return [Difference(self.attributes[i], self.titles[i], self.meanings[i][q[i]], self.meanings[i][g[i]])
                for i in self._order().tolist() if q[i] != g[i]]

    # ------------------------------------------------------------------------------------------------ pictures

    def overlays(self, n: int = 3) -> list[Overlay]:
        """The attention maps of the n top attributes over both crops (see :func:`attrimeter.viz.overlay_pair`).

        Args:
            n: How many attributes, by decreasing contribution.

        Returns:
            One :class:`Overlay` per attribute; its ``gallery`` is None without the gallery crop or maps.

        Raises:
            ValueError: When the explanation holds no query crop or maps (a runtime query given as embeddings).
        """
        from attrimeter.viz import overlay_pair

        if self.query_image is None or self.query_aam is None:
            raise ValueError("this explanation holds no query crop and attention maps to draw overlays with "
                             "(queries searched as embeddings have none)")
        gallery_aam = self.gallery_aam
        out = []
        for i in self._order()[:n]:
            q, g = overlay_pair(self.query_image, self.query_aam[i], self.gallery_image,
                                None if gallery_aam is None else gallery_aam[i])
            out.append(Overlay(self.attributes[i], q, g))
        return out

    def figure(self, out: str | Path | None = None, top: int = 3) -> Figure:
        """The explanation as a picture (see :func:`attrimeter.viz.explain_figure`).

        Args:
            out: PNG file to write, or None.
            top: Attributes whose AAMs are drawn.

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ValueError: When a crop or attention maps are missing (a runtime hit carries the gallery's only when
                searched with overlays, and only when its image file can be read).
        """
        from attrimeter.viz import explain_figure

        missing = [name for name in ("query_image", "gallery_image", "query_aam", "gallery_aam")
                   if getattr(self, name) is None]
        if missing:
            raise ValueError(f"this explanation cannot be drawn without {', '.join(missing)} (a runtime hit carries "
                             "the gallery crop and maps only when searched with overlays > 0)")
        return explain_figure(self.query_image, self.gallery_image, self.query_aam, self.gallery_aam,
                              self.contributions, self.titles, self.d, self.d_hat,
                              differing=[(x.title, x.query, x.gallery) for x in self.differing()], out=out, top=top,
                              labels=("query", "gallery"))

    # ------------------------------------------------------------------------------------------------ words

    def to_dict(self, overlays: int = 0) -> dict[str, Any]:
        """JSON-ready, the HTTP API's ``MatchBody``: hit fields, distances, attribute parts, differences, overlays.

        The hit fields (id, key, path, camera, rank, score) only for a gallery hit; every attribute's
        :class:`AttributeShare` by decreasing contribution; the :meth:`differing` predictions.

        Args:
            overlays: Add ``"overlays"``: base64 PNGs of :meth:`overlays` for this many top attributes.

        Returns:
            A dict of JSON types.
        """
        out: dict[str, Any] = {}
        if self.id is not None:
            out.update(id=int(self.id), key=self.key, path=self.path, camera=self.camera, rank=self.rank,
                       score=None if self.score is None else float(self.score))
        out.update(d=float(self.d), d_hat=float(self.d_hat),
                   attributes=[s._asdict() for s in self.top(len(self.attributes))],
                   differing=[x._asdict() for x in self.differing()])
        if overlays:
            out["overlays"] = [{"attribute": o.attribute, "query": _png_base64(o.query),
                                "gallery": None if o.gallery is None else _png_base64(o.gallery)}
                               for o in self.overlays(overlays)]
        return out

    def to_text(self, top: int = 3, differing: int = 3, score: bool = False) -> str:
        """Lines for a terminal (every character printable): distances, the largest shares, differing predictions.

        Args:
            top: Attributes listed with their share and contribution.
            differing: Differing predictions listed (the rest are counted).
            score: Show the ranking score too (when it is not d).

        Returns:
            A header (rank and key of a hit; d, d_hat, the score), then indented lines: ``largest shares: <title>
            <share>% (<contribution>), ...``, then ``differs: <title>: <query value> -> <gallery value>`` lines.
        """
        head = f"d = {self.d:.4f}  d_hat = {self.d_hat:.4f}"
        if score and self.score is not None:
            head += f"  score = {self.score:.4f}"
        pad = "  "
        if self.rank is not None:  # a hit: "  1. key  d = ...", details under the key
            head, pad = f"{self.rank:>3}. {self.key}  {head}", " " * 7
        lines = [head, f"{pad}largest shares: " + ", ".join(f"{s.title} {100 * s.share:.1f}% ({s.contribution:.4f})"
                                                            for s in self.top(top))]
        diffs = self.differing()
        lines += [f"{pad}differs: {x.title}: {x.query} -> {x.gallery}" for x in diffs[:differing]]
        if len(diffs) > differing:
            lines.append(f"{pad}(+{len(diffs) - differing} more differ)")
        return "\n".join(printable(line) for line in lines)


@dataclass(frozen=True, eq=False)
class QueryResult:
    """The explained hits of one query, best first, and what the model predicts for the query.

    Attributes:
        matches: One :class:`Explanation` per hit.
        query_probs: The query's predicted attribute probabilities ``[M]``.
        attributes: Attribute names ``[M]``.
        meanings: The meaning of label 0 and 1 of each attribute.
        missing_shards: Shards of a sharded gallery that did not answer this partial search (their entries are
            absent from the matches); empty for a complete answer.
    """

    matches: list[Explanation]
    query_probs: np.ndarray
    attributes: tuple[str, ...]
    meanings: tuple[tuple[str, str], ...]
    missing_shards: tuple[str, ...] = ()

    def to_dict(self, overlays: int = 0) -> dict[str, Any]:
        """JSON-ready (the HTTP API's ``QueryResultBody``): the query's predicted attributes and every match.

        Args:
            overlays: Overlays per match (see :meth:`Explanation.to_dict`).

        Returns:
            ``{"query": {name: {"value", "prob"}}, "matches": [...]}``, and ``"missing_shards"`` for a partial answer
            of a sharded gallery.
        """
        out = {"query": predictions(self.attributes, self.meanings, self.query_probs),
               "matches": [m.to_dict(overlays) for m in self.matches]}
        if self.missing_shards:
            out["missing_shards"] = list(self.missing_shards)
        return out

    def to_text(self, top: int = 3, differing: int = 3, score: bool = False) -> str:
        """Every match's :meth:`Explanation.to_text`, one after the other."""
        return "\n".join(m.to_text(top, differing, score) for m in self.matches)


def explanations(dec: Decomposition, *, attributes: tuple[str, ...], titles: tuple[str, ...],
                 meanings: tuple[tuple[str, str], ...], query_probs: np.ndarray, gallery_probs: np.ndarray,
                 query_aam: np.ndarray | None = None, query_images: np.ndarray | None = None,
                 gallery_aam: np.ndarray | Sequence[np.ndarray] | None = None,
                 gallery_images: np.ndarray | Sequence[np.ndarray | None] | None = None,
                 hits: Sequence[Mapping[str, Any]] | None = None) -> list[list[Explanation]]:
    """Explanations of ``[Q, K]`` query/gallery pairs from their decomposition: the one place they are built.

    Query-side arrays are indexed by query; gallery-side ones by pair, flat (``i * K + j``), as gathered.

    Args:
        dec: The pairs' :class:`~attrimeter.runtime.decompose.Decomposition` (``d``, ``d_k``, ``shares``, ``d_hat``,
            ``scores``; ``[Q, K]`` / ``[Q, K, M]``).
        attributes: Attribute names ``[M]``.
        titles: Their human-readable names.
        meanings: The meaning of label 0 and 1 of each attribute.
        query_probs: ``[Q, M]``.
        gallery_probs: ``[Q·K, M]``.
        query_aam: ``[Q, M, h, w]``, or None.
        query_images: ``[Q, H, W, 3]``, or None.
        gallery_aam: ``[Q·K, M, h, w]``, or None.
        gallery_images: ``Q·K`` crops (each may be None), or None.
        hits: For gallery hits, ``Q·K`` mappings with :data:`HIT_FIELDS`; each gets its rank in its row and its
            score from ``dec.scores``. None for pairs that are not hits of a search.

    Returns:
        ``[Q][K]`` explanations.
    """
    q, k = dec.d.shape
    out = []
    for i in range(q):
        query = {"query_probs": query_probs[i], "query_aam": None if query_aam is None else query_aam[i],
                 "query_image": None if query_images is None else query_images[i]}  # one view, shared by the row
        row = []
        for j in range(k):
            n = i * k + j
            hit: dict[str, Any] = {}
            if hits is not None:
                hit = {name: hits[n][name] for name in HIT_FIELDS}
                hit.update(rank=j + 1, score=float(dec.scores[i, j]))
            row.append(Explanation(
                d=float(dec.d[i, j]), d_hat=float(dec.d_hat[i, j]), d_k=dec.d_k[i, j], shares=dec.shares[i, j],
                attributes=attributes, titles=titles, meanings=meanings, gallery_probs=gallery_probs[n],
                gallery_aam=None if gallery_aam is None else gallery_aam[n],
                gallery_image=None if gallery_images is None else gallery_images[n], **query, **hit))
        out.append(row)
    return out
