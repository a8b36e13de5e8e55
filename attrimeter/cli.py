"""The ``attrimeter`` command line: one sub-command per job, heavy imports only inside the job that needs them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrimeter import __version__

if TYPE_CHECKING:
    from attrimeter.runtime.runtime import Runtime

__all__ = ["build_parser", "main"]


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 16 or int(w) < 8:
        raise argparse.ArgumentTypeError(f"size must look like 128x64 (height x width, at least 16x8), got {text!r}")
    return int(h), int(w)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _cpus(text: str) -> float:
    if not text.replace(".", "", 1).isdigit():  # digits with at most one point: no sign, nan or inf
        raise argparse.ArgumentTypeError(f"expected a number of CPUs >= 0, got {text!r}")
    return float(text)


def _cmd_synth(args: argparse.Namespace) -> int:
    from attrimeter.data.synth import SynthConfig, generate

    overrides = {k: v for k, v in (("ids", args.ids), ("cams", args.cams), ("size", args.size),
                                   ("images_per_id", args.images_per_id)) if v is not None}
    summary = generate(args.out, SynthConfig(seed=args.seed, **overrides), progress=not args.quiet)
    if summary.reused:
        print(f"{summary.out} already holds this data set (same settings); nothing rewritten")
        return 0
    print(f"wrote {summary.train_images} train, {summary.query_images} query, {summary.gallery_images} gallery "
          f"images and {summary.counterfactual_pairs} counterfactual pairs to {summary.out} "
          f"({summary.images_per_second:.0f} images/s)")
    return 0


def _train_config(args: argparse.Namespace):  # noqa: ANN202 - returns TargetTrainConfig, imported lazily
    from attrimeter.config import resolve
    from attrimeter.engine.target import PROFILES, TargetTrainConfig

    assignments = list(args.set or [])
    if args.arch:
        assignments.append(f"arch={args.arch}")
    return resolve(TargetTrainConfig(), PROFILES, args.profile, args.config, assignments)


def _cmd_train_target(args: argparse.Namespace) -> int:
    from attrimeter.engine.target import train_target

    log = train_target(args.data, args.out, _train_config(args), progress=not args.quiet)
    print(f"trained {log['iterations']} iterations ({log['epochs']:.1f} epochs) in {log['train_seconds']:.0f} s; "
          f"checkpoint {Path(args.out) / 'target.pt'}")
    if "metrics" in log:
        m = log["metrics"]
        print(f"mAP {m['mAP']:.4f}  rank-1 {m['rank1']:.4f}  rank-5 {m['rank5']:.4f}  rank-10 {m['rank10']:.4f}")
    return 0


def _cmd_import_target(args: argparse.Namespace) -> int:
    from attrimeter.engine.target import import_target, load_target

    out = import_target(args.weights, args.out, args.size, arch=args.arch, style=args.style,
                        last_stride=args.last_stride, pooling=args.pooling, gem_p=args.gem_p)
    d = load_target(out).meta["imported"]
    pooling = f"GeM p={d['gem_p']:.3g}" if d["pooling"] == "gem" else "average pooling"
    print(f"imported {d['style']} {d['arch']} ({pooling}, {'BN-neck' if d['bn_neck'] else 'no BN-neck'}, last stride "
          f"{d['last_stride']}, {d['stem_pool']} stem, input {args.size[0]}x{args.size[1]}): {out}")
    return 0


def _cmd_evaluate_target(args: argparse.Namespace) -> int:
    from attrimeter.engine.target import evaluate_target

    metrics = evaluate_target(args.checkpoint, args.data, progress=not args.quiet).as_dict()
    text = json.dumps({"target": metrics}, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from attrimeter.config import resolve
    from attrimeter.engine.interpreter_training import PROFILES, InterpreterTrainConfig, train_interpreter

    config = resolve(InterpreterTrainConfig(), PROFILES, args.profile, args.config, list(args.set or []))
    log = train_interpreter(args.data, args.target, args.out, config, progress=not args.quiet, resume=args.resume,
                            strict_attributes=args.strict_attributes)
    print(f"trained {log['iterations']} iterations ({log['epochs']:.1f} epochs) in {log['train_seconds']:.0f} s; "
          f"checkpoint {Path(args.out) / 'interpreter.pt'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from attrimeter.engine.interpreter_evaluation import evaluate_checkpoint
    from attrimeter.engine.metrics_table import metrics_markdown

    if args.out and args.out.suffix == ".md":
        raise ValueError(f"--out {args.out}: give the JSON file a .json name (the markdown table goes beside it)")
    metrics = evaluate_checkpoint(args.checkpoint, args.data, progress=not args.quiet, device=args.device,
                                  strict_attributes=args.strict_attributes)
    table = metrics_markdown({"value": metrics})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2))
        args.out.with_suffix(".md").write_text(table)
    print(table, end="")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from attrimeter.engine.runs import resolve_device
    from attrimeter.explain import Interpreter
    from attrimeter.explanation import QueryResult, printable

    e = Interpreter(args.checkpoint, resolve_device(args.device)).explain(args.query, args.gallery)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        e.figure(args.out)
    if args.json:  # the shape of a search result: the query's predicted attributes and the explained pair
        result = QueryResult(matches=[e], query_probs=e.query_probs, attributes=e.attributes, meanings=e.meanings)
        print(json.dumps({"image": str(args.query), **result.to_dict()}, indent=2))
        return 0
    print(e.to_text(top=5, differing=8))
    if args.out:
        print(printable(f"figure {args.out}"))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from attrimeter.artefact.kernels import KernelError
    from attrimeter.export.aot import AotError
    from attrimeter.export.build import export
    from attrimeter.export.onnx_export import ExportError

    targets = None
    if args.targets is not None:
        targets = [] if args.targets.strip().lower() == "none" else [t for t in args.targets.split(",") if t]
    try:
        manifest = export(args.checkpoint, args.out, output_format=args.format, flavor=args.flavor, fp16=args.fp16,
                          opset=args.opset, targets=targets, ptx_version=args.ptx_version, data=args.data,
                          max_batch=args.max_batch, opt_batch=args.opt_batch, timing_cache=args.timing_cache,
                          progress=not args.quiet)
    except (ExportError, AotError, KernelError) as e:
        print(f"attrimeter export: error: {e}", file=sys.stderr)
        return 1
    checks = manifest.verification
    batches = ", ".join(str(r.batch) for r in checks.parity)
    print(f"{args.out}: {manifest.flavor} {manifest.dtype} ONNX (opset {manifest.opset}), checked against "
          f"eager PyTorch at batch {batches}: worst relative error {checks.worst_error:.1e}")
    if checks.retrieval is not None:
        eager, exported = checks.retrieval.eager_fp32, checks.retrieval.export
        print(f"retrieval mAP of d: eager fp32 {eager['d_mAP']:.4f}, export {exported['d_mAP']:.4f}; "
              f"of d_hat: {eager['d_hat_mAP']:.4f}, {exported['d_hat_mAP']:.4f}")
    kernels = manifest.kernels
    if kernels is not None and kernels.targets:
        print(f"AOT kernels for {', '.join(kernels.targets)} in {args.out / 'kernels'}")
    elif kernels is not None and kernels.note:
        print(kernels.note)
    if manifest.tensorrt is not None:
        trt = manifest.tensorrt
        print(f"TensorRT engine {args.out / trt.engine} ({trt.device_name}), worst relative error against "
              f"eager PyTorch {trt.verification.worst_error:.1e}")
    return 0


def _raise_open_file_limit() -> None:
    """Let a gallery process use the hard file limit: every memory-mapped segment file holds a descriptor."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _runtime(args: argparse.Namespace, gallery: Path | None, **config: Any) -> Runtime:
    """The runtime the command line's options describe; ``config``: further :class:`RuntimeConfig` fields."""
    from attrimeter.runtime.runtime import Runtime, RuntimeConfig

    _raise_open_file_limit()
    return Runtime(args.export, gallery, RuntimeConfig(backend=args.backend, device=args.device, threads=args.threads,
                                                       max_batch=args.max_batch, verify=not args.no_verify, **config))


def _index_choice(args: argparse.Namespace) -> Any:
    """``--index KIND --index-param NAME=VALUE ...`` as an IndexChoice, or None when ``--index`` is not given."""
    from attrimeter.runtime.gallery_index import IndexChoice

    if args.index is None:
        if args.index_param:
            raise ValueError("--index-param needs --index")
        return None
    return IndexChoice.parse(args.index, args.index_param or [])


def _save_index(args: argparse.Namespace) -> None:
    """Build ``--index`` for the gallery (every shard of a sharded one) and save it beside the entries."""
    from attrimeter.runtime.distributed import sharded_root
    from attrimeter.runtime.distributed.manifest import read_manifest
    from attrimeter.runtime.gallery import Gallery

    choice = _index_choice(args)
    if choice is None:
        return
    root = sharded_root(args.out)
    if root is None:
        folders = [args.out]
    else:
        manifest = read_manifest(root)[0]
        folders = [manifest.folder(root, i) for i in range(len(manifest.shards))]
    for folder in folders:
        with Gallery.open(folder, writable=True, verify=False, progress=not args.quiet, index=choice) as gallery:
            gallery.save_index()
            kind, count = gallery.index_kind, len(gallery)
        print(f"{folder}: saved its {kind} search index" if kind == choice.kind else
              f"{folder}: {count} entries are too few to train a {choice.kind} index: it is searched exactly "
              "(index it again with --index once it holds more)")


def _connect_ray(address: str) -> None:
    """Connect to a Ray cluster (``""``: RAY_ADDRESS, else the one ``ray start`` made here, else a new local one)."""
    import logging

    try:
        import ray
    except ModuleNotFoundError:
        raise ValueError("--ray needs Ray: pip install 'attrimeter[distributed]'") from None
    ray.init(address=address or None, logging_level=logging.WARNING)


def _cmd_index_ray(args: argparse.Namespace) -> int:
    if args.shards is None:
        raise ValueError("--ray needs --shards N (the number of gallery shards)")
    _connect_ray(args.ray)
    from attrimeter.explanation import printable
    from attrimeter.runtime.distributed.indexing import index_sharded

    report = index_sharded(args.export, args.images, args.out, shards=args.shards, backend=args.backend,
                           device=args.device, threads=args.threads or 1, max_batch=args.max_batch,
                           workers=args.workers, batch_size=args.batch_size, segment=args.segment, metric=args.metric,
                           verify=not args.no_verify, progress=not args.quiet, storage=args.storage)
    for path, reason in report.skipped:
        print(f"skipped {printable(path)}: {printable(reason)}", file=sys.stderr)
    print(f"{args.out}: added {report.added} images, {report.already} were already there, skipped "
          f"{len(report.skipped)}; {len(report.counts)} shards hold {sum(report.counts)} entries "
          f"({', '.join(map(str, report.counts))})")
    _save_index(args)
    return 0


def _storage_mode(args: argparse.Namespace, images: int) -> str:
    """The storage of a new gallery: ``--storage``, else the default mode (int8 below the images a fit needs)."""
    from attrimeter.runtime.storage import DEFAULT_MODE, FIT_MIN_ENTRIES, default_mode

    if args.storage is not None:
        return args.storage
    mode = default_mode(images)
    if mode != DEFAULT_MODE:
        print(f"{args.out}: {images} images are too few to fit the {DEFAULT_MODE!r} storage codecs (at least "
              f"{FIT_MIN_ENTRIES}): storing {mode!r}", file=sys.stderr)
    return mode


def _create_gallery(args: argparse.Namespace) -> None:
    """Create ``--out`` with the storage codecs fitted once on the first images (docs/architecture.md §10)."""
    from attrimeter.runtime.gallery import Gallery
    from attrimeter.runtime.indexing import image_files, new_storage

    files = image_files(args.images)
    with _runtime(args, None) as rt:
        manifest = rt.manifest
        codecs = new_storage(_storage_mode(args, len(files)), files, rt.embed, rt.image_size, dim=manifest.channels,
                             attributes=len(rt.attributes), aam_shape=manifest.aam_shape, batch=rt.config.max_batch)
    Gallery.create(args.out, dim=manifest.channels, attributes=manifest.attribute_names, aam_shape=manifest.aam_shape,
                   model=manifest.model_id, metric=args.metric, storage=codecs).close()


def _cmd_index(args: argparse.Namespace) -> int:
    from attrimeter.explanation import printable
    from attrimeter.runtime.gallery import MANIFEST_NAME

    _index_choice(args)  # a bad --index is refused before any work
    if args.ray is not None:
        return _cmd_index_ray(args)
    if args.shards is not None or args.workers is not None:
        raise ValueError("--shards and --workers need --ray (distributed indexing)")
    if not (args.out / MANIFEST_NAME).exists():
        _create_gallery(args)
    with _runtime(args, args.out, create_gallery=True, metric=args.metric) as rt:
        if args.storage is not None and rt.gallery.storage.mode != args.storage:
            raise ValueError(f"{args.out} stores {rt.gallery.storage.mode!r} (fixed when it was created), not "
                             f"--storage {args.storage}; index into a new folder to change it")
        report = rt.index_folder(args.images, segment=args.segment, progress=not args.quiet)
        for path, reason in report.skipped:
            print(f"skipped {printable(path)}: {printable(reason)}", file=sys.stderr)
        print(f"{args.out}: added {report.added} images ({rt.backend.name} on {rt.backend.device}), skipped "
              f"{len(report.skipped)} unreadable; the gallery holds {len(rt.gallery)} entries")
    _save_index(args)
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    from attrimeter.runtime.errors import LockedGalleryError
    from attrimeter.runtime.gallery import Gallery

    _raise_open_file_limit()
    try:
        gallery = Gallery.open(args.gallery, writable=True, progress=not args.quiet)
    except LockedGalleryError as e:
        # Only the writer may compact; say how to reach it instead of only that it is there.
        raise LockedGalleryError(
            f"{e}. Only the gallery's writer can compact it: a server started with --writable (or any writable "
            "Runtime/Gallery) merges its small segments itself as it appends (auto_compact), and a program can call "
            "compact() on its own writable Gallery (Runtime.gallery.compact()) while it serves: searches go on and "
            "readers pick the merged segment up. Otherwise stop the writer and run attrimeter compact again.") from e
    with gallery as g:
        before = g.segments
        g.compact(progress=not args.quiet)
        print(f"{args.gallery}: {len(g)} entries, {before} segments merged into {g.segments}")
    return 0


def _search_weights(groups: dict[str, list[str]], ignore: str | None,
                    weights: Sequence[str] | None) -> dict[str, float] | None:
    """``--ignore`` (attribute or group names → weight 0) and ``--weight name=w`` → a weight mapping."""
    if not ignore and not weights:
        return None
    out: dict[str, float] = {}
    for item in (ignore or "").split(","):
        item = item.strip()
        if item:
            out.update(dict.fromkeys(groups.get(item, [item]), 0.0))  # a group name stands for its attributes
    for item in weights or []:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--weight must look like name=number, got {item!r}") from None
    return out


def _cmd_search(args: argparse.Namespace) -> int:
    from attrimeter.explanation import printable

    with _runtime(args, args.gallery, index=_index_choice(args)) as rt:
        groups: dict[str, list[str]] = {}
        for a in rt.manifest.attributes:
            groups.setdefault(a.group or a.name, []).append(a.name)
        weights = _search_weights(groups, args.ignore, args.weight)
        results = rt.search([str(q) for q in args.queries], k=args.k, weights=weights)
    if args.json:
        print(json.dumps([{"image": str(q), **r.to_dict()} for q, r in zip(args.queries, results, strict=True)],
                         indent=2))
        return 0
    for query, result in zip(args.queries, results, strict=True):
        print(f"{printable(str(query))}:")
        print(result.to_text(score=weights is not None))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    try:
        from attrimeter.runtime.server import ServerLimits, serve
    except ModuleNotFoundError as e:
        raise ValueError(f"attrimeter serve needs the HTTP server's packages ({e.name} is missing): "
                         "pip install 'attrimeter[runtime,serve]'") from None

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.writable and args.gallery is None:
        raise ValueError("--writable needs --gallery")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    limits = ServerLimits(max_body_bytes=args.max_body_mb * 1024 * 1024, max_images=args.max_images,
                          request_timeout_s=args.request_timeout, decode_workers=args.decode_workers,
                          max_connections=args.max_connections, backlog=args.backlog)
    sharded = None
    if args.ray is not None or args.partial_shards:
        from attrimeter.runtime.distributed import sharded_root
        from attrimeter.runtime.distributed.sharded import ShardedGallery

        if args.gallery is None or sharded_root(args.gallery) is None:
            raise ValueError("--ray and --partial-shards need --gallery with a sharded gallery (index --ray)")
        if args.ray is not None:
            _connect_ray(args.ray)
        sharded = ShardedGallery.open(args.gallery, mode="local" if args.ray is None else "ray",
                                      verify=not args.no_verify, partial=args.partial_shards,
                                      timeout_s=args.shard_timeout, actor_options={"num_cpus": args.shard_cpus},
                                      index=_index_choice(args))
    try:
        rt = _runtime(args, args.gallery if sharded is None else sharded, writable=args.writable,
                      max_wait_ms=args.max_wait_ms, queue_timeout_s=args.queue_timeout, index=_index_choice(args))
    except BaseException:
        if sharded is not None:  # the runtime closes the gallery it was given, once it exists
            sharded.close()
        raise
    try:
        serve(rt, args.host, args.port, limits)
    except OSError as e:  # e.g. the port is taken: a message, not a traceback (serve has closed the runtime)
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {e}") from None
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from attrimeter.models.registry import list_models

    print("\n".join(list_models(args.pattern)))
    return 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from attrimeter.data.schema import get_schema, list_schemas

    for name in [args.name] if args.name else list_schemas():
        schema = get_schema(name)
        print(f"{schema.name}: {len(schema)} attributes")
        for group, names in schema.groups.items():
            print(f"  {group}:")
            for attr in names:
                a = schema[attr]
                print(f"    {a.name:<12} 1 = {a.meanings[0]}; 2 = {a.meanings[1]}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from attrimeter.demo import run_demo

    report = run_demo(args.out, progress=not args.quiet)
    print(f"demo finished: report {report}")
    return 0


def _runtime_errors() -> tuple[type[Exception], ...]:
    """The runtime's user-facing errors that are not ValueErrors (its modules import no torch)."""
    from attrimeter.runtime.backends import BackendError
    from attrimeter.runtime.errors import OverloadedError, UnknownIdError

    return BackendError, UnknownIdError, OverloadedError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command (exposed for documentation and tests)."""
    from attrimeter.runtime.storage import DEFAULT_MODE, FALLBACK_MODE, FIT_MIN_ENTRIES, STORAGE_MODES

    parser = argparse.ArgumentParser(prog="attrimeter", description="Explainable person re-identification.")
    parser.add_argument("--version", action="version", version=f"attrimeter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=fn)
        return p

    p = add("synth", _cmd_synth, "Render a synthetic pedestrian data set in the Market-1501 layout.")
    p.add_argument("--out", required=True, type=Path, help="output folder (new, or a previous synth output)")
    p.add_argument("--ids", type=_positive, help="identities (half train, half test)")
    p.add_argument("--cams", type=_positive, help="cameras")
    p.add_argument("--size", type=_size, help="image size HxW, e.g. 128x64")
    p.add_argument("--images-per-id", type=_positive, help="average images per identity")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, byte-identical data)")

    def add_strict_attributes(p: argparse.ArgumentParser) -> None:
        p.add_argument("--strict-attributes", action="store_true",
                       help="refuse an attribute file with codes other than 1 and 2 (by default they load as unknown, "
                            "with a warning naming them, and are left out of the attribute losses and metrics)")

    def add_config_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", choices=["quick", "full"], default="quick", help="preset (default quick)")
        p.add_argument("--config", type=Path, help="YAML file of config overrides")
        p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=1e-3")

    p = add("train-target", _cmd_train_target, "Train a target ReID model (ID + triplet loss).")
    p.add_argument("--data", required=True, type=Path, help="Market-1501 / DukeMTMC-reID style folder")
    p.add_argument("--out", required=True, type=Path, help="run folder for target.pt, config.yaml, train_log.json")
    p.add_argument("--arch", help="registered model name (see `attrimeter models`)")
    add_config_options(p)

    p = add("import-target", _cmd_import_target,
            "Turn a fast-reid or torchreid ResNet checkpoint into a target (same embedding), to explain it.")
    p.add_argument("weights", type=Path, help="the checkpoint (.pth), e.g. fast-reid's model_final.pth")
    p.add_argument("--out", required=True, type=Path, help="run folder for target.pt")
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50"],
                   help="the ResNet in the checkpoint (default resnet50)")
    p.add_argument("--style", choices=["auto", "fast-reid", "torchreid"], default="auto",
                   help="checkpoint layout (default: from its keys)")
    p.add_argument("--last-stride", type=int, choices=[1, 2],
                   help="layer4 stride the model was trained with (default: fast-reid 1, torchreid 2)")
    p.add_argument("--pooling", choices=["auto", "avg", "gem"], default="auto",
                   help="auto: fast-reid's learnable GeM if the checkpoint has its p, else average pooling; gem: "
                        "fixed-p GeM (fast-reid GeneralizedMeanPooling)")
    p.add_argument("--gem-p", type=float, default=3.0, help="p of --pooling gem (default 3)")
    p.add_argument("--size", type=_size, default=(256, 128), help="input size HxW it was trained at (default 256x128)")

    p = add("evaluate-target", _cmd_evaluate_target, "mAP / CMC of a target checkpoint (Market protocol).")
    p.add_argument("--data", required=True, type=Path, help="data folder with query/ and bounding_box_test/")
    p.add_argument("--checkpoint", required=True, type=Path, help="target.pt")
    p.add_argument("--out", type=Path, help="write the metrics JSON here too")

    p = add("train", _cmd_train, "Train an interpreter (AttriMeter) on a frozen target.")
    p.add_argument("--data", required=True, type=Path, help="data folder with attribute annotations")
    p.add_argument("--target", required=True, type=Path, help="the target's target.pt")
    p.add_argument("--out", required=True, type=Path, help="run folder for interpreter.pt, config.yaml, train_log.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/interpreter_last.pt")
    add_strict_attributes(p)
    add_config_options(p)

    p = add("evaluate", _cmd_evaluate, "Retrieval and explanation metrics of an interpreter (docs/architecture.md §8).")
    p.add_argument("--data", required=True, type=Path, help="data folder with query/, bounding_box_test/, attributes")
    p.add_argument("--checkpoint", required=True, type=Path, help="interpreter.pt")
    p.add_argument("--out", type=Path, help="write metrics JSON here (and a markdown table beside it, .md)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu or cuda[:N]")
    add_strict_attributes(p)

    p = add("explain", _cmd_explain, "Explain the distance between two person crops.")
    p.add_argument("query", type=Path, help="first image")
    p.add_argument("gallery", type=Path, help="second image")
    p.add_argument("--checkpoint", required=True, type=Path, help="interpreter.pt")
    p.add_argument("--out", type=Path, help="PNG figure to write")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu or cuda[:N]")

    p = add("export", _cmd_export, "Export an interpreter to ONNX (+ AOT kernels, + a TensorRT engine), verified.")
    p.add_argument("--checkpoint", required=True, type=Path, help="interpreter.pt")
    p.add_argument("--out", required=True, type=Path, help="export folder (an older export there is replaced)")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="default onnx")
    p.add_argument("--flavor", choices=["portable", "plugin"],
                   help="portable (standard ops) or plugin (one attrimeter::MaskedGemPool node); default portable "
                        "for onnx, plugin for tensorrt")
    p.add_argument("--fp16", action="store_true", help="FP16 graph (judged on retrieval: needs --data)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, default 18)")
    p.add_argument("--targets", help="GPU targets of the AOT kernels, comma-separated, or none (default "
                                     "sm_80,sm_86,sm_87,sm_89,sm_90 where Triton is installed)")
    p.add_argument("--ptx-version", help="PTX ISA of the AOT kernels, e.g. 8.4 for a CUDA 12.4 driver (default: "
                                         "Triton's newest)")
    p.add_argument("--data", type=Path, help="data folder: also compare retrieval metrics with eager PyTorch")
    p.add_argument("--max-batch", type=_positive, default=256, help="TensorRT profile's largest batch (default 256)")
    p.add_argument("--opt-batch", type=_positive, default=32, help="TensorRT profile's tuned batch (default 32)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache to reuse and update")

    def add_runtime_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--export", required=True, type=Path, help="export folder (attrimeter export)")
        p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt", "torch"], default="auto",
                       help="inference backend (default auto: TensorRT where the export has an engine that runs "
                            "here, else ONNX Runtime)")
        p.add_argument("--device", help="backend device, e.g. cpu or cuda:0 (default: the backend's choice)")
        p.add_argument("--threads", type=_positive, help="CPU threads of the backend")
        p.add_argument("--max-batch", type=_positive, default=32, help="images per engine call (default 32)")
        p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of export and gallery files")

    def add_index_options(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--index", choices=["flat", "ivf", "hnsw"],
                       help=f"{what}: flat (exact), ivf (FAISS IVF-PQ) or hnsw, candidates re-ranked exactly "
                            "(benchmarks/results/ann_cpu.md)")
        p.add_argument("--index-param", action="append", metavar="NAME=VALUE",
                       help="a parameter of --index, e.g. nlist=1024, nprobe=16, pq_m=32, m=32, ef_search=64, "
                            "rerank=10 (repeatable)")

    def add_ray_option(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help=f"{what} on a Ray cluster: ADDRESS (e.g. 10.0.0.1:6379), or none for RAY_ADDRESS / the "
                            "cluster `ray start` made on this machine / a new local one")

    p = add("index", _cmd_index, "Embed an image folder into a gallery store (created or appended; resumable), or "
                                 "with --ray into a sharded gallery on a Ray cluster.")
    add_runtime_options(p)
    p.add_argument("--images", required=True, type=Path,
                   help="image folder (searched recursively); with --ray also a text file listing one image per line")
    p.add_argument("--out", required=True, type=Path, help="gallery folder")
    add_ray_option(p, "index into a sharded gallery (SHARDS stores + shards.json)")
    p.add_argument("--shards", type=_positive, help="with --ray: number of gallery shards")
    p.add_argument("--workers", type=_positive,
                   help="with --ray: most embedding workers (default: one per GPU, else half the CPUs / threads)")
    p.add_argument("--batch-size", type=_positive, default=64,
                   help="with --ray: images per Ray Data batch (default 64)")
    p.add_argument("--segment", type=_positive, default=4096, help="images per crash-safe segment (default 4096)")
    p.add_argument("--metric", choices=["l2", "ip"], default="l2",
                   help="a new gallery's search metric: l2 (the target distance d, default) or ip (cosine)")
    p.add_argument("--storage", choices=list(STORAGE_MODES),
                   help=f"how a new gallery stores attribute embeddings and maps: {DEFAULT_MODE} (default: 3x smaller "
                        f"than float16, fitted on the first images; {FALLBACK_MODE} below {FIT_MIN_ENTRIES} images), "
                        "int8, float16, or compact-nomaps (maps recomputed from the crop for overlays); an existing "
                        "gallery keeps its own")
    add_index_options(p, "build and save this search index with the gallery (every shard's with --ray); searches "
                         "and servers load it")

    p = add("compact", _cmd_compact, "Merge a gallery's segments into one (ids kept; crash-safe, like appends; "
                                      "readers keep answering). A running writer compacts through its own handle.")
    p.add_argument("--gallery", required=True, type=Path, help="gallery folder")

    p = add("search", _cmd_search, "Search a gallery with query images and explain the hits.")
    add_runtime_options(p)
    p.add_argument("queries", nargs="+", type=Path, help="query images")
    p.add_argument("--gallery", required=True, type=Path, help="gallery folder (attrimeter index)")
    p.add_argument("--k", type=_positive, default=10, help="hits per query (default 10)")
    p.add_argument("--ignore", help="attributes or attribute groups to ignore in the ranking, comma-separated "
                                    "(e.g. 'upper-body colour,lower-body colour')")
    p.add_argument("--weight", action="append", metavar="NAME=W", help="weight of one attribute in the ranking")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_index_options(p, "search index (default: the one saved with the gallery, else flat)")

    p = add("serve", _cmd_serve, "Serve embed / search / explain / add over HTTP (JSON, OpenAPI at /openapi.json) "
                                 "with Prometheus metrics, and the explanation viewer at /viewer/.")
    add_runtime_options(p)
    p.add_argument("--gallery", type=Path, help="gallery folder, or a sharded gallery's folder (index --ray)")
    p.add_argument("--writable", action="store_true", help="allow POST /gallery/add (takes the gallery's writer lock)")
    add_index_options(p, "search index (default: the one saved with the gallery, else flat)")
    add_ray_option(p, "serve a sharded gallery with one Ray actor per shard")
    p.add_argument("--partial-shards", action="store_true",
                   help="sharded gallery: answer from the shards that answer, naming the missing ones in "
                        "missing_shards (default: 503)")
    p.add_argument("--shard-timeout", type=_seconds, default=30.0,
                   help="with --ray: how long a search waits for the shards (default 30 s)")
    p.add_argument("--shard-cpus", type=_cpus, default=1.0,
                   help="with --ray: CPUs Ray reserves for each shard's actor (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="dynamic batching wait (default 2 ms)")
    p.add_argument("--max-body-mb", type=_positive, default=16, help="largest request body in MiB (default 16)")
    p.add_argument("--max-images", type=_positive, default=64, help="most images per request (default 64)")
    p.add_argument("--queue-timeout", type=_seconds, default=1.0,
                   help="longest a request waits for the engine before a 503 (default 1 s)")
    p.add_argument("--request-timeout", type=_seconds, default=30.0,
                   help="deadline for a request's head and for its body (default 30 s)")
    p.add_argument("--max-connections", type=_positive, default=64,
                   help="most open connections and requests in progress, then 503 (default 64)")
    p.add_argument("--backlog", type=_positive, default=2048, help="connections queued by the kernel (default 2048)")
    p.add_argument("--decode-workers", type=_positive, default=2,
                   help="images decoded at once over all requests: bounds decoding memory (default 2)")

    p = add("models", _cmd_models, "List the registered target architectures.")
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern")

    p = add("schemas", _cmd_schemas, "Show the attribute schemas and what each value means.")
    p.add_argument("name", nargs="?", help="market1501 or dukemtmc (default: both)")

    p = add("demo", _cmd_demo, "The main job on the CPU: synthetic data, target training, evaluation, report.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attrimeter`` console script.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Process exit status: 0 on success, 2 on a user error (reported on stderr without a traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, *_runtime_errors()) as e:
        # User-facing errors (bad data folder, unknown name, bad config, corrupt image) carry a clear message; a
        # traceback would only hide it. Programming errors still raise.
        message = e.args[0] if isinstance(e, LookupError) and e.args else str(e)
        parser.exit(2, f"attrimeter {args.command}: error: {message}\n")
