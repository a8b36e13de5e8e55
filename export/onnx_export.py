"""ONNX export of a trained interpreter, verified against eager PyTorch, with its manifest (docs/architecture.md §5).

The graph: ``images`` [B, 3, H, W] float32 RGB in [0, 1] (normalisation inside) → ``embedding`` [B, C],
``attr_embeddings`` [B, M, C], ``aam`` [B, M, h, w], ``attr_logits`` [B, M], all float32, B dynamic; in the
``portable`` or the ``plugin`` flavour of :class:`~attrimeter.export.onnx_graph.ExportGraph`.

FP16 (``fp16=True``) exports an FP16 graph (TensorRT 11 has no FP16 builder flag; strongly typed networks take the
graph's types): the input stays float32 and is cast once; powers and sums of the pooling run in float32 inside the
graph and the plugin (F³ overflows fp16 for F > 40); outputs are cast back to float32.

Every export is checked before it is published: the portable graph in ONNX Runtime, the plugin graph in ONNX's
reference evaluator with a numpy ``MaskedGemPool``, at batch sizes 1 and > 1 on one session (so the batch really is
dynamic), against the eager fp32 model. fp32 exports must agree to ``‖out − ref‖/‖ref‖ ≤ 1e-4``; fp16 exports are
judged on retrieval (``data=...``: mAP and rank-1 of d and d̂ on the data's query/gallery, eager fp32 vs export).
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attrimeter.artefact.contract import (
    FLAVORS,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAMES,
    PLUGIN_ID,
    PLUGIN_NAMESPACE,
)
from attrimeter.artefact.manifest import (
    MANIFEST_NAME,
    Attribute,
    Manifest,
    Normalization,
    ParityCheck,
    PluginNode,
    Pooling,
    RetrievalCheck,
    Source,
    TensorInfo,
    Verification,
    sha256_file,
    write_manifest,
)
from attrimeter.export.onnx_graph import ExportGraph, register_onnx_schema, translation_table
from attrimeter.kernels import integer_exponent

__all__ = [
    "ExportError",
    "check_parity",
    "check_retrieval",
    "export_onnx",
    "masked_gem_pool_numpy",
    "onnx_session",
]

# torch's ONNX exporter writes opset 18 natively; its down-conversion to 17 fails on this model (ReduceMean /
# ReduceLogSumExp axes), so 18 is the floor (docs/architecture.md §5).
MIN_OPSET = 18
MAX_BATCH = 4096
FP32_TOLERANCE = 1e-4
# fp16 graphs are judged on retrieval (mAP of d and d̂ may move by at most this much against eager fp32); their
# outputs must still be within a loose bound of eager fp32, which catches a broken graph when no data is given.
FP16_MAP_TOLERANCE = 0.01
FP16_TOLERANCE = 5e-2


class ExportError(RuntimeError):
    """The export cannot be made or does not reproduce the eager model; the message says which and by how much."""


# --------------------------------------------------------------------------------------------------------------------
# Running an export on the CPU: ONNX Runtime (portable) and ONNX's reference evaluator (plugin)
# --------------------------------------------------------------------------------------------------------------------


def masked_gem_pool_numpy(
    F: np.ndarray, Z: np.ndarray, scale: np.ndarray, shift: np.ndarray, p: float, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Numpy twin of the ``MaskedGemPool`` node (factorised form, float32 accumulation, outputs in F's dtype).

    Args:
        F: Feature map [B, C, h, w].
        Z: Attention logits [B, M, h, w].
        scale: BN scale [C].
        shift: BN shift [C].
        p: GeM exponent.
        eps: GeM clamp floor.

    Returns:
        ``(f [B, C], f_k [B, M, C])``.
    """
    B, C = F.shape[:2]
    M = Z.shape[1]
    g = np.maximum(F.astype(np.float32), np.float32(eps)).reshape(B, C, -1) ** np.float32(p)
    z = Z.astype(np.float32).reshape(B, M, -1)
    a = np.where(z < 0, np.exp(np.minimum(z, 0)), np.sqrt(1 + np.maximum(z, 0))) ** np.float32(p)
    rows = np.concatenate([np.ones_like(a[:, :1]), a], axis=1)  # row 0: A ≡ 1, the global embedding
    mean = rows @ g.transpose(0, 2, 1) / g.shape[-1]
    out = np.maximum(mean, np.float32(eps) ** np.float32(p)) ** np.float32(1.0 / p)
    out = out * scale.astype(np.float32) + shift.astype(np.float32)
    out = out.astype(F.dtype)
    return out[:, 0], out[:, 1:]


def onnx_session(model_path: str | Path, flavor: str) -> Any:
    """A CPU session with ``run(output_names, feeds)`` for an exported graph.

    ONNX Runtime for portable graphs; ONNX's reference evaluator (with :func:`masked_gem_pool_numpy`) for plugin
    graphs, which ONNX Runtime cannot run.

    Args:
        model_path: The ``.onnx`` file.
        flavor: Its flavour.

    Returns:
        An object with ``run(None, {"images": array})`` returning the outputs in order.
    """
    if flavor == "portable":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class MaskedGemPool(OpRun):
        op_domain = PLUGIN_NAMESPACE

        def _run(self, F, Z, scale, shift, p=None, eps=None, **_attributes):  # noqa: D102
            return masked_gem_pool_numpy(F, Z, scale, shift, float(p), float(eps))

    register_onnx_schema()
    return ReferenceEvaluator(str(model_path), new_ops=[MaskedGemPool])


def _relative_errors(outputs: Sequence[np.ndarray], reference: Sequence[Tensor]) -> dict[str, float]:
    errors = {}
    for name, out, ref in zip(OUTPUT_NAMES, outputs, reference, strict=True):
        ref_np = ref.detach().double().numpy()
        if out.shape != ref_np.shape:
            raise ExportError(f"output {name!r} has shape {list(out.shape)}, the eager model {list(ref_np.shape)}")
        if not np.isfinite(out).all():
            raise ExportError(f"output {name!r} of the export holds NaN/inf where the eager model is finite")
        errors[name] = float(np.linalg.norm(out - ref_np) / max(np.linalg.norm(ref_np), 1e-30))
    return errors


def check_parity(session: Any, eager: ExportGraph, image_size: tuple[int, int], batches: Sequence[int],
                  tolerance: float, seed: int = 0) -> tuple[ParityCheck, ...]:
    """Run an export and the eager fp32 model on the same random images at each batch size, on one session.

    Args:
        session: Anything with ONNX Runtime's ``run(None, {"images": array}) -> outputs`` (an ONNX Runtime session,
            the reference evaluator, a TensorRT engine runner).
        eager: The fp32 eager graph of the interpreter the export came from (``ExportGraph(model)``).
        image_size: ``(H, W)``.
        batches: Batch sizes, run in order on the same session.
        tolerance: Largest ``‖out − ref‖/‖ref‖`` of any output.
        seed: Seed of the random images.

    Returns:
        Per batch size, the relative error of each output.

    Raises:
        ExportError: If an output differs by more than ``tolerance``, has another shape, or is not finite.
    """
    rng = torch.Generator().manual_seed(seed)
    results = []
    for b in batches:
        x = torch.rand(b, 3, *image_size, generator=rng)
        with torch.no_grad():
            ref = eager(x)
        errors = _relative_errors(session.run(None, {INPUT_NAME: x.numpy()}), ref)
        results.append(ParityCheck(b, errors))
        worst = max(errors, key=errors.__getitem__)
        if errors[worst] > tolerance:
            raise ExportError(f"the export differs from eager PyTorch at batch {b}: ‖out − ref‖/‖ref‖ of {worst!r} "
                              f"is {errors[worst]:.2e} > {tolerance:.0e}")
    return tuple(results)


def _embed(run: Any, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, M+1, C]`` stacked embeddings of uint8 images [N, H, W, 3] through ``run(float images) -> outputs``."""
    rows = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        f, f_k = run(x)[:2]
        rows.append(np.concatenate([f[:, None], f_k], axis=1))
    return np.concatenate(rows).astype(np.float32)


def _retrieval(stacked_q: np.ndarray, stacked_g: np.ndarray, data: Any) -> dict[str, float]:
    from attrimeter.engine.evaluation import evaluate_rank

    q_pids, q_cams = np.array([s.pid for s in data.query]), np.array([s.camid for s in data.query])
    g_pids, g_cams = np.array([s.pid for s in data.gallery]), np.array([s.camid for s in data.gallery])
    out = {}
    # d: the target distance (row 0); d̂: the mean per-attribute distance (rows 1..M).
    for key, dist in (("d", lambda q, g: np.linalg.norm(q[:, None, 0] - g[None, :, 0], axis=-1)),
                      ("d_hat", lambda q, g: np.linalg.norm(q[:, None, 1:] - g[None, :, 1:], axis=-1).mean(-1))):
        m = evaluate_rank(stacked_q, stacked_g, q_pids, g_pids, q_cams, g_cams, distance=dist, chunk_size=16)
        out[f"{key}_mAP"], out[f"{key}_rank1"] = float(m.mAP), m.rank(1)
    return out


def check_retrieval(session: Any, eager: ExportGraph, data_root: str | Path, image_size: tuple[int, int],
                    enforce: bool, progress: bool, batch: int = 64,
                    eager_metrics: Mapping[str, float] | None = None, graph: str | None = None) -> RetrievalCheck:
    """Retrieval metrics (mAP, rank-1 of d and d̂) of eager fp32 and of an export on a data set's query/gallery.

    Args:
        session: As for :func:`check_parity`.
        eager: As for :func:`check_parity`.
        data_root: A data set folder (Market-1501 layout).
        image_size: ``(H, W)``.
        enforce: Raise when a mAP moves by more than ``FP16_MAP_TOLERANCE`` (reduced-precision exports).
        progress: Show decoding progress.
        batch: Images per run of the export (≤ a TensorRT engine's largest batch).
        eager_metrics: Eager fp32's metrics when already measured (not recomputed).
        graph: Which graph ``session`` runs when it is not the export's own (recorded with the metrics).

    Returns:
        The data set and both models' metrics.

    Raises:
        ExportError: If ``enforce`` and the export changes retrieval.
    """
    from attrimeter.data.formats import load_dataset
    from attrimeter.data.images import read_images

    data = load_dataset(data_root)

    def run_eager(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in eager(torch.from_numpy(x))]

    def run_export(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {INPUT_NAME: x})

    split_images = [read_images([s.path for s in split], image_size, progress=progress, desc=f"decode {name}")
                    for name, split in (("query", data.query), ("gallery", data.gallery))]
    eager_m = eager_metrics or _retrieval(*(_embed(run_eager, im, 64) for im in split_images), data)
    export_m = _retrieval(*(_embed(run_export, im, batch) for im in split_images), data)
    result = RetrievalCheck(str(Path(data_root).resolve()), eager_m, export_m, graph)
    if enforce:
        for key in ("d_mAP", "d_hat_mAP"):
            if abs(export_m[key] - eager_m[key]) > FP16_MAP_TOLERANCE:
                raise ExportError(f"the export changes retrieval: {key} {export_m[key]:.4f} vs eager fp32 "
                                  f"{eager_m[key]:.4f} (tolerance {FP16_MAP_TOLERANCE})")
    return result


# --------------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import onnx

    from attrimeter import __version__

    out = {"attrimeter": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
           "python": platform.python_version()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def _attribute_schema(meta: dict[str, Any]) -> tuple[Attribute, ...]:
    from attrimeter.data.schema import get_schema

    schema = get_schema(meta["schema"])
    return tuple(Attribute(a.name, a.title, (a.meanings[0], a.meanings[1]), a.group)
                 for a in (schema[name] for name in meta["attributes"]))


def _torch_export(graph: ExportGraph, path: Path, example: Tensor, opset: int) -> None:
    """``torch.onnx.export`` of an :class:`ExportGraph` with the fixed names and a dynamic batch."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        # The exporter narrates its steps on stdout and warns about optional packages (torchvision ops): noise next
        # to our own report; its errors still raise.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet_loggers("torch.onnx"):
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_shapes=({0: batch},), opset_version=opset, external_data=False,
                              custom_translation_table=translation_table(), verbose=False)
    except Exception as e:  # the exporter raises many types; say which stage failed
        raise ExportError(f"torch.onnx.export failed ({graph.flavor}, opset {opset}): {e}") from e


@contextlib.contextmanager
def _quiet_loggers(prefix: str) -> Iterator[None]:
    """Raise the level of every ``logging`` logger under ``prefix`` to ERROR for the duration."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(prefix)]
    loggers.append(logging.getLogger(prefix))
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _publish(staging: Path, out_dir: Path) -> None:
    """Move a finished export into place; an older export there is replaced, anything else is refused."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file()):
        raise ExportError(f"{out_dir} exists and is not an export folder: refusing to overwrite it")
    # Old aside, new in, old gone: at every moment one complete export is at out_dir or at the backup.
    backup = staging.with_name(staging.name + "-previous")
    out_dir.rename(backup)
    try:
        staging.rename(out_dir)
    except OSError:
        backup.rename(out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def export_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    flavor: str = "portable",
    fp16: bool = False,
    opset: int = 18,
    verify_batches: Sequence[int] = (1, 7),
    data: str | Path | None = None,
    progress: bool = True,
    extra: Callable[[Path, Manifest, ExportGraph], Manifest] | None = None,
) -> Manifest:
    """Export an interpreter checkpoint to ONNX, verify it, and publish the folder with its manifest.

    The folder is built beside ``out_dir`` and renamed into place only once verified, so a failed export never
    leaves a half-written or unverified model where a runtime would load it.

    Args:
        checkpoint: ``interpreter.pt`` (self-contained: the target is inside).
        out_dir: The export folder to create (an older export there is replaced).
        flavor: ``"portable"`` (standard ops) or ``"plugin"`` (one ``attrimeter::MaskedGemPool`` node).
        fp16: Export an FP16 graph (float32 input and outputs).
        opset: ONNX opset, ≥ 18.
        verify_batches: Batch sizes checked against eager PyTorch, all on one session.
        data: A data set root: also compare retrieval metrics of the export with eager fp32 (required to judge an
            fp16 export; recorded in the manifest).
        progress: Show progress.
        extra: Optional callable ``(staging_dir, manifest, eager) -> manifest`` that adds files and returns the
            manifest describing them (the AOT kernels, a TensorRT engine) before the manifest is written and the folder
            published; ``eager`` is the
            fp32 eager graph the checks compare with.

    Returns:
        The manifest written.

    Raises:
        FileNotFoundError: If the checkpoint does not exist.
        ValueError: On a bad flavour or opset.
        ExportError: If export, checker or verification fail (the message says which check and by how much).
    """
    import onnx

    from attrimeter.engine.interpreter_checkpoint import load_interpreter

    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    if not verify_batches or any(b < 1 or b > MAX_BATCH for b in verify_batches):
        raise ValueError(f"verify_batches must be batch sizes in 1..{MAX_BATCH}, got {list(verify_batches)}")
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    ck = load_interpreter(checkpoint)
    model = ck.model
    height, width = ck.image_size
    graph = ExportGraph(model, flavor, fp16)
    # The reference every check compares with: eager fp32 with the portable pooling (the graph itself when it is one).
    eager = graph if flavor == "portable" and not fp16 else ExportGraph(model)
    register_onnx_schema()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published folder should read like any other
    stages = ["torch.onnx.export", "onnx.checker", "parity", *(["retrieval"] if data else []),
              *(["kernels / engine"] if extra else []), "publish"]
    bar = tqdm(total=len(stages), unit="step", disable=not progress, bar_format="{desc} ({n}/{total})")
    started: list[str] = []

    def stage(name: str) -> None:
        if started:
            bar.update()
        started.append(name)
        bar.set_description_str(f"export: {name}")

    try:
        stage("torch.onnx.export")
        onnx_path = staging / MODEL_FILE
        example = torch.rand(2, 3, height, width)
        _torch_export(graph, onnx_path, example, opset)
        stage("onnx.checker")
        proto = onnx.load(str(onnx_path))
        actual = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if actual != opset:
            raise ExportError(f"asked for opset {opset}, torch.onnx.export wrote opset {actual}")
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"onnx.checker rejects the {flavor} export: {e}") from None
        stage("parity")
        session = onnx_session(onnx_path, flavor)
        tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
        parity = check_parity(session, eager, (height, width), verify_batches, tolerance)
        retrieval = None
        if data:
            stage("retrieval")
            if flavor == "plugin":
                # ONNX's reference evaluator takes minutes per batch: retrieval runs in ONNX Runtime on the portable
                # twin, which differs only by the pooling node whose numpy twin the parity check just covered.
                twin = staging / ".portable-twin.onnx"
                _torch_export(ExportGraph(model, "portable", fp16), twin, example, opset)
                retrieval = check_retrieval(onnx_session(twin, "portable"), eager, data, (height, width), fp16,
                                            progress, graph="portable twin")
                twin.unlink()
            else:
                retrieval = check_retrieval(session, eager, data, (height, width), fp16, progress)
        h, w = (d.dim_value for d in proto.graph.output[OUTPUT_NAMES.index("aam")].type.tensor_type.shape.dim[2:])
        num_attributes, channels = model.num_attributes, model.num_features
        manifest = Manifest(
            flavor=flavor,
            dtype="float16" if fp16 else "float32",
            opset=opset,
            model=MODEL_FILE,
            inputs={INPUT_NAME: TensorInfo(("batch", 3, height, width), "float32", layout="NCHW",
                                           value_range=(0.0, 1.0), channels="RGB")},
            outputs={
                "embedding": TensorInfo(("batch", channels), "float32"),
                "attr_embeddings": TensorInfo(("batch", num_attributes, channels), "float32"),
                "aam": TensorInfo(("batch", num_attributes, h, w), "float32"),
                "attr_logits": TensorInfo(("batch", num_attributes), "float32"),
            },
            max_batch=MAX_BATCH,
            image_size=(height, width),
            feature_map=(channels, h, w),
            normalization=_normalization(model),
            pooling=Pooling(float(model.p), float(model.eps), integer_exponent(model.p)),
            schema=ck.meta["schema"],
            attributes=_attribute_schema(ck.meta),
            classifier=model.classifier,
            plugin=PluginNode(PLUGIN_ID, ("F", "Z", "scale", "shift"), ("f", "f_k")) if flavor == "plugin" else None,
            source=Source(str(checkpoint.resolve()), sha256_file(checkpoint)),
            versions=_versions(),
            verification=Verification(tolerance, parity, retrieval,
                                      runner="onnxruntime" if flavor == "portable" else "onnx.reference"),
        )
        if extra is not None:
            stage("kernels / engine")
            manifest = extra(staging, manifest, eager)
        stage("publish")
        written = write_manifest(staging, manifest)
        _publish(staging, out_dir)
        bar.update()
    finally:
        bar.close()
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return written


def _normalization(model: nn.Module) -> Normalization:
    target = model.target
    mean, std = getattr(target, "pixel_mean", None), getattr(target, "pixel_std", None)
    if mean is None or std is None:
        return Normalization(inside_graph=True)
    return Normalization(True, tuple(float(v) for v in mean.flatten()), tuple(float(v) for v in std.flatten()))
