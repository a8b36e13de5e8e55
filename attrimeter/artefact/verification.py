"""How an export (or its TensorRT engine) was checked against eager PyTorch: parts of the typed manifest.

See :mod:`attrimeter.artefact.manifest`; each record reads itself from the manifest's JSON (``from_json``, errors
naming the field) and writes the same layout back (``to_json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attrimeter.artefact.jsonfields import JsonField

__all__ = ["ParityCheck", "RetrievalCheck", "Verification"]


def _floats(f: JsonField) -> dict[str, float]:
    return {name: value.as_float() for name, value in f.members()}


@dataclass(frozen=True)
class ParityCheck:
    """One batch size of the check against eager PyTorch: ``‖out − ref‖/‖ref‖`` of each output."""

    batch: int
    relative_error: Mapping[str, float]

    @classmethod
    def from_json(cls, f: JsonField) -> ParityCheck:
        """Read and check one entry of ``verification.parity``."""
        return cls(f.key("batch").as_int(1), _floats(f.key("relative_error")))

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"batch": self.batch, "relative_error": dict(self.relative_error)}


@dataclass(frozen=True)
class RetrievalCheck:
    """Retrieval metrics (mAP and rank-1 of d and d̂) of eager fp32 and of the export on a data set.

    Attributes:
        data: The data set's folder.
        eager_fp32: Eager PyTorch's metrics, e.g. ``{"d_mAP": 0.86, ...}``.
        export: The export's metrics.
        graph: Which graph ran when it is not the export's own (``"portable twin"`` for a plugin graph).
    """

    data: str
    eager_fp32: Mapping[str, float]
    export: Mapping[str, float]
    graph: str | None = None

    @classmethod
    def from_json(cls, f: JsonField) -> RetrievalCheck:
        """Read and check a ``retrieval`` record."""
        graph = f.optional("graph")
        return cls(f.key("data").as_str(), _floats(f.key("eager_fp32")), _floats(f.key("export")),
                   None if graph is None else graph.as_str())

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {"data": self.data, "eager_fp32": dict(self.eager_fp32), "export": dict(self.export)}
        if self.graph is not None:
            out["graph"] = self.graph
        return out


@dataclass(frozen=True)
class Verification:
    """How an export (or its engine) was checked against eager PyTorch before it was published.

    Attributes:
        tolerance: The bound every parity check met.
        parity: Per batch size, the relative error of each output.
        retrieval: The retrieval check, when data were given.
        runner: What ran the graph (``"onnxruntime"``, ``"onnx.reference"``); None for an engine.
    """

    tolerance: float
    parity: tuple[ParityCheck, ...]
    retrieval: RetrievalCheck | None = None
    runner: str | None = None

    @property
    def worst_error(self) -> float:
        """The largest relative error of any output at any batch size."""
        return max((e for check in self.parity for e in check.relative_error.values()), default=0.0)

    @classmethod
    def from_json(cls, f: JsonField) -> Verification:
        """Read and check a ``verification`` record."""
        retrieval, runner = f.optional("retrieval"), f.optional("runner")
        return cls(f.key("tolerance").as_float(), tuple(ParityCheck.from_json(p) for p in f.key("parity").items()),
                   None if retrieval is None else RetrievalCheck.from_json(retrieval),
                   None if runner is None else runner.as_str())

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {} if self.runner is None else {"runner": self.runner}
        out.update(tolerance=self.tolerance, parity=[p.to_json() for p in self.parity],
                   retrieval=None if self.retrieval is None else self.retrieval.to_json())
        return out
