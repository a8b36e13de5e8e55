"""What an export compiled beside its ONNX graph: AOT kernels and a TensorRT engine (parts of the typed manifest).

See :mod:`attrimeter.artefact.manifest`; each record reads itself from the manifest's JSON (``from_json``, errors
naming the field) and writes the same layout back (``to_json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attrimeter.artefact.jsonfields import JsonField
from attrimeter.artefact.verification import Verification

__all__ = ["EnginePlugin", "EngineProfile", "KernelsInfo", "TensorRTInfo"]


@dataclass(frozen=True)
class KernelsInfo:
    """The AOT kernels in ``kernels/``, or why there are none.

    Attributes:
        index: ``kernels/index.json`` (relative to the export folder), or None when there are no kernels.
        launch_table: ``kernels/launch.txt``, the C launcher's table.
        targets: The GPU targets compiled, e.g. ``("sm_80", "sm_90")``.
        triton_version: The Triton that compiled them.
        ptx_version: The PTX ISA asked for (None: Triton's newest).
        pool_max_shared: Cap on the pooling kernel's shared memory (a TensorRT plugin engine's 48 KiB), or None.
        note: Why there are no kernels (e.g. Triton missing), or None.
    """

    index: str | None = None
    launch_table: str | None = None
    targets: tuple[str, ...] = ()
    triton_version: str | None = None
    ptx_version: str | None = None
    pool_max_shared: int | None = None
    note: str | None = None

    @classmethod
    def from_json(cls, f: JsonField) -> KernelsInfo:
        """Read and check ``kernels`` (either the compiled kernels or a note saying why there are none)."""
        if f.optional("index") is None:
            return cls(note=f.key("note").as_str())
        ptx, cap, triton = f.optional("ptx_version"), f.optional("pool_max_shared"), f.optional("triton_version")
        return cls(index=f.key("index").as_str(), launch_table=f.key("launch_table").as_str(),
                   targets=tuple(t.as_str() for t in f.key("targets").items()),
                   triton_version=None if triton is None else triton.as_str(),
                   ptx_version=None if ptx is None else ptx.as_str(),
                   pool_max_shared=None if cap is None else cap.as_int(1))

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        if self.index is None:
            return {"note": self.note}
        return {"index": self.index, "launch_table": self.launch_table, "targets": list(self.targets),
                "triton_version": self.triton_version, "ptx_version": self.ptx_version,
                "pool_max_shared": self.pool_max_shared}


@dataclass(frozen=True)
class EngineProfile:
    """The engine's optimisation profile: the input's name and its smallest, tuned and largest shape."""

    input: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    @classmethod
    def from_json(cls, f: JsonField) -> EngineProfile:
        """Read and check ``tensorrt.profile``."""
        shapes = [tuple(d.as_int(1) for d in f.key(k).items(4)) for k in ("min", "opt", "max")]
        return cls(f.key("input").as_str(), *shapes)

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"input": self.input, "min": list(self.min_shape), "opt": list(self.opt_shape),
                "max": list(self.max_shape)}


@dataclass(frozen=True)
class EnginePlugin:
    """The AOT kernel a plugin engine carries: plugin id, GPU target, entry symbol, dtype, PTX and its metadata."""

    id: str
    target: str
    symbol: str
    dtype: str
    ptx_target: str
    ptx_version: str
    kernel_json: str

    @classmethod
    def from_json(cls, f: JsonField) -> EnginePlugin:
        """Read and check ``tensorrt.plugin``."""
        return cls(*(f.key(k).as_str() for k in ("id", "target", "symbol", "dtype", "ptx_target", "ptx_version",
                                                 "kernel_json")))

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"id": self.id, "target": self.target, "symbol": self.symbol, "dtype": self.dtype,
                "ptx_target": self.ptx_target, "ptx_version": self.ptx_version, "kernel_json": self.kernel_json}


@dataclass(frozen=True)
class TensorRTInfo:
    """The TensorRT engine beside the ONNX graph: where it is, what built it, and its checks.

    Attributes:
        engine: The engine file (relative to the export folder).
        max_batch: The largest batch of its optimisation profile.
        tensorrt_version: The TensorRT that built it (an engine runs only with that version).
        device_name: The GPU it was built on (and runs on).
        compute_capability: That GPU's compute capability as an int (90 for sm_90).
        cuda_driver_version: ``cuDriverGetVersion`` at build time.
        build_seconds: Build time.
        profile: The optimisation profile.
        engine_bytes: Size of the serialized engine.
        plugin_kernel_target: The plugin kernel's GPU target, None without plugin.
        plugin: The plugin kernel, None without plugin.
        timing_cache: The timing cache file, or None.
        workspace_gib: The workspace memory limit.
        verification: The engine's checks against eager PyTorch.
    """

    engine: str
    max_batch: int
    tensorrt_version: str
    device_name: str
    compute_capability: int
    cuda_driver_version: int
    build_seconds: float
    profile: EngineProfile
    engine_bytes: int
    plugin_kernel_target: str | None
    plugin: EnginePlugin | None
    timing_cache: str | None
    workspace_gib: float
    verification: Verification

    @classmethod
    def from_json(cls, f: JsonField) -> TensorRTInfo:
        """Read and check ``tensorrt``."""
        target, plugin, cache = f.optional("plugin_kernel_target"), f.optional("plugin"), f.optional("timing_cache")
        return cls(engine=f.key("engine").as_str(), max_batch=f.key("max_batch").as_int(1),
                   tensorrt_version=f.key("tensorrt_version").as_str(), device_name=f.key("device_name").as_str(),
                   compute_capability=f.key("compute_capability").as_int(0),
                   cuda_driver_version=f.key("cuda_driver_version").as_int(0),
                   build_seconds=f.key("build_seconds").as_float(), profile=EngineProfile.from_json(f.key("profile")),
                   engine_bytes=f.key("engine_bytes").as_int(0),
                   plugin_kernel_target=None if target is None else target.as_str(),
                   plugin=None if plugin is None else EnginePlugin.from_json(plugin),
                   timing_cache=None if cache is None else cache.as_str(),
                   workspace_gib=f.key("workspace_gib").as_float(),
                   verification=Verification.from_json(f.key("verification")))

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"engine": self.engine, "max_batch": self.max_batch, "tensorrt_version": self.tensorrt_version,
                "device_name": self.device_name, "compute_capability": self.compute_capability,
                "cuda_driver_version": self.cuda_driver_version, "build_seconds": self.build_seconds,
                "profile": self.profile.to_json(), "engine_bytes": self.engine_bytes,
                "plugin_kernel_target": self.plugin_kernel_target,
                "plugin": None if self.plugin is None else self.plugin.to_json(), "timing_cache": self.timing_cache,
                "workspace_gib": self.workspace_gib, "verification": self.verification.to_json()}
