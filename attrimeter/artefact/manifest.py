"""The export folder's manifest as one typed record: what each file is, how to feed the model, and its checks.

:class:`Manifest` is what the exporter writes (:func:`write_manifest`) and what the runtime reads
(:func:`load_manifest`); nothing else reads ``manifest.json`` (docs/architecture.md §5). Torch-free (json and hashlib
only), so the runtime reads and verifies exports on a box with numpy alone.

Loading checks every field the code relies on, with an error naming the bad field (``field 'attributes[3].meanings'
must be an array of 2, got ['a']``), and the sha256 of every listed file: a tampered, truncated or swapped model is
refused with an error naming the file. The manifest is written last and atomically (temporary file, then rename), so
a folder whose export was interrupted has either no manifest or the previous complete one, never a half-written one.
The JSON layout is the one exports have always had (format ``attrimeter-export``, version 1): older exports load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from attrimeter.artefact.compiled import EnginePlugin, EngineProfile, KernelsInfo, TensorRTInfo
from attrimeter.artefact.contract import DTYPES, FLAVORS, INPUT_NAME, OUTPUT_NAMES
from attrimeter.artefact.jsonfields import JsonField
from attrimeter.artefact.verification import ParityCheck, RetrievalCheck, Verification

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Attribute",
    "EnginePlugin",
    "EngineProfile",
    "KernelsInfo",
    "Manifest",
    "ManifestError",
    "Normalization",
    "ParityCheck",
    "PluginNode",
    "Pooling",
    "RetrievalCheck",
    "Source",
    "TensorInfo",
    "TensorRTInfo",
    "Verification",
    "file_hashes",
    "load_manifest",
    "sha256_file",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "attrimeter-export"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """An export folder that cannot be used: no or foreign manifest, a bad field, a missing file, a hash mismatch."""


# --------------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Attribute:
    """One attribute of the model's schema, in the order of the model's outputs.

    Attributes:
        name: E.g. ``"upblack"``.
        title: Human-readable name, e.g. ``"black upper-body clothing"``.
        meanings: What label 0 and label 1 mean.
        group: The schema group (e.g. ``"upper-body colour"``), or None.
    """

    name: str
    title: str
    meanings: tuple[str, str]
    group: str | None = None

    @classmethod
    def from_json(cls, f: JsonField) -> Attribute:
        """Read and check one entry of ``attributes``."""
        meanings = f.key("meanings").items(2)
        group = f.optional("group")
        return cls(f.key("name").as_str(), f.key("title").as_str(), (meanings[0].as_str(), meanings[1].as_str()),
                   None if group is None else group.as_str())

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"name": self.name, "title": self.title, "meanings": list(self.meanings), "group": self.group}


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: shape (``"batch"`` for the dynamic axis), dtype and, for the input, its encoding.

    Attributes:
        shape: Dimensions; the string ``"batch"`` marks the dynamic batch axis.
        dtype: Element type, e.g. ``"float32"``.
        layout: ``"NCHW"`` for the image input; None for outputs.
        value_range: The input's value range, ``(0.0, 1.0)``; None for outputs.
        channels: ``"RGB"`` for the image input; None for outputs.
    """

    shape: tuple[int | str, ...]
    dtype: str
    layout: str | None = None
    value_range: tuple[float, float] | None = None
    channels: str | None = None

    @classmethod
    def from_json(cls, f: JsonField) -> TensorInfo:
        """Read and check one entry of ``inputs`` / ``outputs``."""
        shape: list[int | str] = []
        for dim in f.key("shape").items():
            shape.append(dim.as_str(("batch",)) if isinstance(dim.value, str) else dim.as_int(1))
        layout, channels, value_range = f.optional("layout"), f.optional("channels"), f.optional("range")
        low_high = None if value_range is None else value_range.items(2)
        return cls(tuple(shape), f.key("dtype").as_str(), None if layout is None else layout.as_str(),
                   None if low_high is None else (low_high[0].as_float(), low_high[1].as_float()),
                   None if channels is None else channels.as_str())

    def to_json(self) -> dict[str, Any]:
        """The JSON object (the input's encoding keys only where set)."""
        out: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        if self.layout is not None:
            out["layout"] = self.layout
        if self.value_range is not None:
            out["range"] = list(self.value_range)
        if self.channels is not None:
            out["channels"] = self.channels
        return out


@dataclass(frozen=True)
class Normalization:
    """How pixels are normalised: inside the graph, with the target's mean and std where it has them.

    Attributes:
        inside_graph: True: the graph takes RGB in [0, 1] and normalises itself.
        mean: Per-channel mean, or None.
        std: Per-channel standard deviation, or None.
    """

    inside_graph: bool
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_json(cls, f: JsonField) -> Normalization:
        """Read and check ``normalization``."""
        mean, std = f.optional("mean"), f.optional("std")
        return cls(f.key("inside_graph").as_bool(), None if mean is None else tuple(v.as_float() for v in mean.items()),
                   None if std is None else tuple(v.as_float() for v in std.items()))

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        out: dict[str, Any] = {"inside_graph": self.inside_graph}
        if self.mean is not None:
            out["mean"] = list(self.mean)
        if self.std is not None:
            out["std"] = list(self.std)
        return out


@dataclass(frozen=True)
class Pooling:
    """The GeM pooling baked into the export: exponent p, clamp floor eps, and p as an integer (0 when it is not)."""

    p: float
    eps: float
    p_int: int

    @classmethod
    def from_json(cls, f: JsonField) -> Pooling:
        """Read and check ``pooling``."""
        return cls(f.key("p").as_float(), f.key("eps").as_float(), f.key("p_int").as_int(0))

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"p": self.p, "eps": self.eps, "p_int": self.p_int}


@dataclass(frozen=True)
class PluginNode:
    """The plugin flavour's custom node: ``op`` (namespace::name) with its input and output names."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def from_json(cls, f: JsonField) -> PluginNode:
        """Read and check ``plugin``."""
        return cls(f.key("op").as_str(), tuple(v.as_str() for v in f.key("inputs").items()),
                   tuple(v.as_str() for v in f.key("outputs").items()))

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"op": self.op, "inputs": list(self.inputs), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class Source:
    """The interpreter checkpoint the export was made from: its path when exported and its sha256 (the model id)."""

    checkpoint: str
    sha256: str

    @classmethod
    def from_json(cls, f: JsonField) -> Source:
        """Read and check ``source``."""
        return cls(f.key("checkpoint").as_str(), f.key("sha256").as_sha256())

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"checkpoint": self.checkpoint, "sha256": self.sha256}


# --------------------------------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Manifest:
    """Everything an export folder says about itself (``manifest.json``).

    Attributes:
        flavor: ``"portable"`` or ``"plugin"`` (see :data:`~attrimeter.artefact.contract.FLAVORS`).
        dtype: The graph's float dtype, ``"float32"`` or ``"float16"``.
        opset: ONNX opset.
        model: The ONNX file (relative to the export folder).
        inputs: The graph's input by name (``images``).
        outputs: The graph's outputs by name (``embedding``, ``attr_embeddings``, ``aam``, ``attr_logits``).
        max_batch: The largest batch the graph was exported for.
        image_size: ``(H, W)`` of the input.
        feature_map: ``(C, h, w)``: embedding size and the attention maps' size.
        normalization: How pixels are normalised.
        pooling: The GeM pooling's p and eps.
        schema: The attribute schema's name (``"market1501"``).
        attributes: The attributes, in the order of the outputs.
        classifier: The interpreter's attribute classifier (``"probe"`` or ``"map"``).
        plugin: The plugin node (plugin flavour), or None.
        source: The checkpoint it came from; its sha256 identifies the model.
        versions: Package versions at export time.
        verification: The graph's checks against eager PyTorch.
        kernels: The AOT kernels, or None when none were asked for.
        tensorrt: The TensorRT engine, or None.
        files: sha256 of every file of the folder but the manifest, by POSIX path (set by :func:`write_manifest`).
    """

    flavor: str
    dtype: str
    opset: int
    model: str
    inputs: Mapping[str, TensorInfo]
    outputs: Mapping[str, TensorInfo]
    max_batch: int
    image_size: tuple[int, int]
    feature_map: tuple[int, int, int]
    normalization: Normalization
    pooling: Pooling
    schema: str
    attributes: tuple[Attribute, ...]
    classifier: str
    plugin: PluginNode | None
    source: Source
    versions: Mapping[str, str]
    verification: Verification
    kernels: KernelsInfo | None = None
    tensorrt: TensorRTInfo | None = None
    files: Mapping[str, str] = field(default_factory=dict)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The attributes' names, in output order."""
        return tuple(a.name for a in self.attributes)

    @property
    def channels(self) -> int:
        """C: the size of the global and of each attribute embedding."""
        return self.feature_map[0]

    @property
    def aam_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the attention maps."""
        return self.feature_map[1], self.feature_map[2]

    @property
    def model_id(self) -> str:
        """The sha256 of the source checkpoint: galleries record it, so that one indexed by another model is refused."""
        return self.source.sha256

    @classmethod
    def from_json(cls, doc: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Read and check a parsed manifest.

        Args:
            doc: What ``json.loads`` gave.
            where: The file, for messages.

        Returns:
            The manifest.

        Raises:
            ManifestError: Not an AttriMeter export manifest of a known version, or a field that is missing, of the
                wrong type or out of range (the message names it).
        """
        f = JsonField.root(doc, where, ManifestError)
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where} is not an AttriMeter export manifest")
        if doc.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{where}: unsupported manifest version {doc.get('version')!r} "
                                f"(this AttriMeter reads version {MANIFEST_VERSION}; re-export)")
        inputs = {name: TensorInfo.from_json(t) for name, t in f.key("inputs").members()}
        if list(inputs) != [INPUT_NAME]:
            raise f.key("inputs").fail(f"an object with the one input {INPUT_NAME!r}")
        outputs = {name: TensorInfo.from_json(t) for name, t in f.key("outputs").members()}
        if set(outputs) != set(OUTPUT_NAMES):
            raise f.key("outputs").fail(f"an object with the outputs {list(OUTPUT_NAMES)}")
        attributes = tuple(Attribute.from_json(a) for a in f.key("attributes").items())
        names = [a.name for a in attributes]
        if not attributes or len(set(names)) != len(names):
            raise f.key("attributes").fail("a non-empty array of attributes with distinct names")
        plugin, kernels, tensorrt = f.optional("plugin"), f.optional("kernels"), f.optional("tensorrt")
        h, w = (d.as_int(1) for d in f.key("image_size").items(2))
        c, fh, fw = (d.as_int(1) for d in f.key("feature_map").items(3))
        manifest = cls(
            flavor=f.key("flavor").as_str(FLAVORS), dtype=f.key("dtype").as_str(DTYPES),
            opset=f.key("opset").as_int(1), model=f.key("model").as_str(), inputs=inputs, outputs=outputs,
            max_batch=f.key("max_batch").as_int(1), image_size=(h, w), feature_map=(c, fh, fw),
            normalization=Normalization.from_json(f.key("normalization")),
            pooling=Pooling.from_json(f.key("pooling")), schema=f.key("schema").as_str(), attributes=attributes,
            classifier=f.key("classifier").as_str(), plugin=None if plugin is None else PluginNode.from_json(plugin),
            source=Source.from_json(f.key("source")),
            versions={k: v.as_str() for k, v in f.key("versions").members()},
            verification=Verification.from_json(f.key("verification")),
            kernels=None if kernels is None else KernelsInfo.from_json(kernels),
            tensorrt=None if tensorrt is None else TensorRTInfo.from_json(tensorrt),
            files=_files(f.key("files")))
        for name, listed in (("model", manifest.model),
                             ("tensorrt.engine", None if manifest.tensorrt is None else manifest.tensorrt.engine)):
            if listed is not None and listed not in manifest.files:
                raise ManifestError(f"{where}: field {name!r} names {listed!r}, which 'files' does not list")
        return manifest

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json`` (the same layout :meth:`from_json` reads)."""
        return {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "flavor": self.flavor, "dtype": self.dtype,
            "opset": self.opset, "model": self.model,
            "inputs": {k: v.to_json() for k, v in self.inputs.items()},
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
            "max_batch": self.max_batch, "image_size": list(self.image_size), "feature_map": list(self.feature_map),
            "normalization": self.normalization.to_json(), "pooling": self.pooling.to_json(), "schema": self.schema,
            "attributes": [a.to_json() for a in self.attributes], "classifier": self.classifier,
            "plugin": None if self.plugin is None else self.plugin.to_json(), "source": self.source.to_json(),
            "versions": dict(self.versions), "verification": self.verification.to_json(),
            "kernels": None if self.kernels is None else self.kernels.to_json(),
            "tensorrt": None if self.tensorrt is None else self.tensorrt.to_json(), "files": dict(self.files),
        }  # fmt: skip


def _files(f: JsonField) -> dict[str, str]:
    files = {rel: digest.as_sha256() for rel, digest in f.members()}
    if not files:
        raise f.error(f"{f.where} lists no files")
    for rel in files:
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts:
            raise f.error(f"{f.where} lists {rel!r}, which lies outside the export folder")
    return files


# --------------------------------------------------------------------------------------------------- files


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Args:
        path: The file.

    Returns:
        The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(export_dir: str | Path) -> dict[str, str]:
    """The sha256 of every file under ``export_dir`` but the manifest, keyed by POSIX path relative to the folder.

    Args:
        export_dir: The export folder.

    Returns:
        ``{relative path: sha256}``, sorted by path.
    """
    root = Path(export_dir)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and not path.name.startswith(".tmp-"):
            out[rel] = sha256_file(path)
    return out


def write_manifest(export_dir: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file of the folder into ``files`` and write ``manifest.json`` atomically.

    Args:
        export_dir: The export folder, holding everything the manifest describes.
        manifest: The description (its ``files`` are replaced by the folder's).

    Returns:
        The manifest as written.

    Raises:
        ManifestError: The description does not read back as a valid manifest (e.g. its model file is missing).
    """
    root = Path(export_dir)
    body = replace(manifest, files=file_hashes(root)).to_json()
    path = root / MANIFEST_NAME
    written = Manifest.from_json(body, str(path))  # what a reader will get, checked before it is published
    tmp = root / f".tmp-{MANIFEST_NAME}"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return written


def load_manifest(export_dir: str | Path, verify: bool = True) -> Manifest:
    """Read an export folder's manifest and, by default, check every recorded file against its sha256.

    Args:
        export_dir: The export folder (written by ``attrimeter export``).
        verify: Check the hashes (reads every file once; pass False only for a quick look at the metadata).

    Returns:
        The manifest.

    Raises:
        ManifestError: If the folder or its manifest is missing or unreadable, the manifest is not an AttriMeter export
            of a known version or has a bad field, or a recorded file is missing or differs from its hash.
    """
    root = Path(export_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"export folder {root} does not exist (create it with `attrimeter export`)")
    if not path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}: not an export folder, or its export did not finish")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not readable JSON: {e}") from None
    manifest = Manifest.from_json(doc, str(path))
    if verify:
        for rel, expected in manifest.files.items():
            file = root / rel
            if not file.is_file():
                raise ManifestError(f"{root}: {rel} is listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != expected:
                raise ManifestError(
                    f"{root}: {rel} does not match its sha256 in the manifest (expected {expected[:12]}…, got "
                    f"{actual[:12]}…): the file changed after export; re-export rather than edit an export folder"
                )
    return manifest
