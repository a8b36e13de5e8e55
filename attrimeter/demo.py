"""The main job, ``attrimeter demo``: synthetic data → target → interpreter (+ ablations) → evaluation → HTML report."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from attrimeter.data.formats import ReIDDataset, Sample

__all__ = ["ABLATIONS", "DEMO_SYNTH", "ranking_figure", "run_demo"]

# 360 train identities over 6 cameras: the foundation issue's acceptance set-up, sized for the 2-core CPU budget.
DEMO_SYNTH = {"ids": 720, "cams": 6}


def ranking_figure(
    query_paths: list[Path],
    ranked_paths: list[list[Path]],
    correct: list[list[bool]],
    out: str | Path,
    scale: int = 2,
) -> Path:
    """Draw query images next to their top-k gallery images, green border = same identity, red = different.

    Args:
        query_paths: One image per row.
        ranked_paths: The top-k gallery images of each query.
        correct: Whether each ranked image shows the query's identity.
        out: PNG file to write.
        scale: Upsampling factor for legibility.

    Returns:
        The written path.
    """
    from PIL import Image, ImageDraw

    from attrimeter.data.images import read_image

    h, w = read_image(query_paths[0], (128, 64)).shape[:2]
    k = max(len(r) for r in ranked_paths)
    pad, gap = 3, 12
    cell_w, cell_h = w + 2 * pad, h + 2 * pad
    canvas = Image.new("RGB", ((k + 1) * cell_w + gap, len(query_paths) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (q, ranked, ok) in enumerate(zip(query_paths, ranked_paths, correct, strict=True)):
        y = row * cell_h
        canvas.paste(Image.fromarray(read_image(q, (h, w))), (pad, y + pad))
        for col, (g, good) in enumerate(zip(ranked, ok, strict=True)):
            x = (col + 1) * cell_w + gap
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=(40, 170, 60) if good else (210, 40, 40))
            canvas.paste(Image.fromarray(read_image(g, (h, w))), (x + pad, y + pad))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    out = Path(out)
    canvas.save(out)
    return out


ABLATIONS: dict[str, dict[str, float]] = {
    "AttriMeter": {},
    "without attribute prior": {"prior_weight": 0.0},
    "without metric distillation": {"distill_weight": 0.0},
}
_CHANGES = (("interpreter", "mAP", "interpreter mAP"), ("interpreter", "adre", "ADRE"),
            ("interpreter", "x_map_e", "X-mAP_e"), ("interpreter", "cf_top1", "counterfactual top-1"),
            ("interpreter", "cf_share", "changed attributes' share"), ("interpreter", "max_share", "largest share"))


def _ablation_text(runs: dict[str, dict]) -> str:
    """One sentence per ablation: how the headline metrics move against the full model."""
    full = runs["AttriMeter"]["interpreter"]
    items = []
    for name, metrics in list(runs.items())[1:]:
        parts = []
        for _, key, title in _CHANGES:
            if key in full and key in metrics["interpreter"]:
                a, b = full[key], metrics["interpreter"][key]
                parts.append(f"{title} {a:.2f}% → {b:.2f}%" if key == "adre" else f"{title} {a:.3f} → {b:.3f}")
        items.append(f"<li><b>{html.escape(name)}</b>: {html.escape('; '.join(parts))}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _table_html(markdown: str) -> str:
    rows = [line.strip("|").split("|") for line in markdown.strip().splitlines()]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows[2:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _report_html(runs: dict[str, dict], train_log: dict, interp_log: dict, timings: dict[str, float],
                 figure: str, explained: list[tuple[str, str]], runtime_html: str) -> str:
    from attrimeter.engine.metrics_table import metrics_markdown

    full = runs["AttriMeter"]
    t = full["target"]
    early = [log["stopped_early"] for log in (train_log, interp_log) if log.get("stopped_early")]
    warning = "".join(f'<p style="color:#b00"><b>Not the configured run:</b> {html.escape(w)}</p>' for w in early)
    steps = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    pictures = "".join(f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}" width="880">'
                       f"<figcaption>{html.escape(cap)}</figcaption></figure>" for src, cap in explained)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>AttriMeter demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:64em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:left}}figure{{margin:1em 0}}
figcaption{{color:#444}}</style></head><body>
<h1>AttriMeter demo</h1>{warning}
<p>Synthetic pedestrians ({train_log['train_ids']} train identities, {train_log['train_images']} train images).
The target ReID model was trained on the CPU for {train_log['iterations']} iterations ({train_log['epochs']:.1f}
epochs); the interpreter, grafted on the frozen target, for {interp_log['iterations']} iterations
({interp_log['epochs']:.1f} epochs). Retrieval under the Market-1501 protocol; the target ranks by its distance d,
the interpreter by its decomposed distance d̂. X-mAP on random cross-identity query–gallery pairs; counterfactual
metrics on pairs that differ in exactly one attribute (same person, camera and pose): the share of d that the
changed attribute(s) take, against the uniform share N<sub>e</sub>/M. How peaked the explanations are: the mean
largest share and the share entropy over ln M on cross-identity pairs (1 = flat bars). AAM localisation: on the
counterfactual images, how often an attribute's attention map peaks on the pixels where the attribute is drawn.
The paper protocol: X-mAP and ADRE over every query × gallery pair, with the authors' rule for pairs that agree on
every attribute.</p>
<h2>Metrics</h2>{_table_html(metrics_markdown({"AttriMeter": full}))}
<h2>Ablation</h2><p>The same training budget without one of the losses.</p>
{_table_html(metrics_markdown(runs))}{_ablation_text(runs)}
<h2>Explained matches and non-matches</h2><p>Each figure: the query and a gallery image, the attention maps of the
attributes that contribute most to their distance, every attribute's contribution c<sub>k</sub> = p<sub>k</sub>·d
(they sum to the target distance d), and the predicted attributes on which the two differ.</p>{pictures}
<h2>Target ranked lists</h2><p>Each row: a query, then its top-ranked gallery images (green: same identity, red:
another identity; same-camera matches are excluded by the protocol). {t['rank1']:.3f} rank-1,
{t['mAP']:.3f} mAP.</p><img src="{html.escape(figure)}" alt="ranked lists">
<h2>Explained search with the deployed model</h2>{runtime_html}
<h2>Timings</h2><table>{steps}</table></body></html>
"""


def _explained_pairs(data: ReIDDataset, qf: np.ndarray, gf: np.ndarray, count: int) -> list[tuple[Sample, Sample, str]]:
    """For ``count`` queries: the best-ranked true match and the best-ranked other identity (a hard non-match)."""
    from attrimeter.data.formats import DISTRACTOR_PID
    from attrimeter.engine.evaluation import euclidean_distances

    rng = np.random.default_rng(1)
    picks = sorted(rng.choice(len(data.query), size=min(count, len(data.query)), replace=False))
    dist = euclidean_distances(qf[picks], gf)
    pairs = []
    for row, i in zip(dist, picks, strict=True):
        q = data.query[i]
        order = np.argsort(row, kind="stable")
        match = next((j for j in order if data.gallery[j].pid == q.pid and data.gallery[j].camid != q.camid), None)
        other = next(j for j in order if data.gallery[j].pid not in (q.pid, DISTRACTOR_PID))
        if match is not None:
            pairs.append((q, data.gallery[match], "match"))
        pairs.append((q, data.gallery[other], "non-match"))
    return pairs


def _runtime_search(out: Path, data: ReIDDataset, explainer: Any, qf: np.ndarray, gf: np.ndarray, count: int,
                    k: int, progress: bool) -> tuple[str, dict[str, Any], dict[str, float]]:
    """Export → index → explained search with the torch-free runtime, compared with the PyTorch explanations.

    ``qf``/``gf`` are eager PyTorch target embeddings of ``data.query``/``data.gallery``: the runtime's FAISS order
    is checked against their ranking. Returns the report's HTML section, the agreement figures for
    ``metrics.json`` and the step timings.
    """
    import shutil

    from attrimeter.engine.evaluation import euclidean_distances
    from attrimeter.export.build import export
    from attrimeter.runtime.runtime import Runtime, RuntimeConfig

    timings = {}
    t0 = time.perf_counter()
    export(out / "interpreter" / "interpreter.pt", out / "export", targets=(), progress=progress)
    timings["export (portable ONNX, checked against PyTorch)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shutil.rmtree(out / "gallery", ignore_errors=True)  # derived from this run's model: rebuilt every time
    rng = np.random.default_rng(2)
    picks = sorted(rng.choice(len(data.query), size=min(count, len(data.query)), replace=False))
    queries = [data.query[i] for i in picks]
    with Runtime(out / "export", out / "gallery", RuntimeConfig(backend="onnxruntime", create_gallery=True)) as rt:
        report = rt.index_folder(data.root / "bounding_box_test", progress=progress)
        if report.skipped:
            raise ValueError(f"the demo gallery has unreadable images: {report.skipped[:3]}")
        indexed = len(rt.gallery)
        timings[f"runtime: index {indexed} gallery images"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # overlays: the hits carry their crops and attention maps, so that the best one can be drawn below
        results = rt.search([q.path for q in queries], k=k, overlays=1)
        timings[f"runtime: search + explain {len(queries)} queries"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    worst = {"d": 0.0, "d_hat": 0.0, "shares": 0.0}
    same_order, sections = 0, []
    (out / "runtime").mkdir(exist_ok=True)
    torch_dist = euclidean_distances(qf[picks], gf)
    torch_rank = np.argsort(torch_dist, axis=1, kind="stable")[:, :k]
    valid = 0
    for n, (q, result) in enumerate(zip(queries, results, strict=True)):
        torch_side = explainer.explain_many(q.path, [m.path for m in result.matches])
        rows = []
        for m, e in zip(result.matches, torch_side, strict=True):
            worst["d"] = max(worst["d"], abs(m.d - e.d) / max(e.d, 1e-12))
            worst["d_hat"] = max(worst["d_hat"], abs(m.d_hat - e.d_hat) / max(e.d_hat, 1e-12))
            worst["shares"] = max(worst["shares"], float(np.abs(m.shares - e.shares).max()))
            top_rt, top_pt = (", ".join(f"{s.title} {100 * s.share:.0f}%" for s in x.top(3)) for x in (m, e))
            rows.append(f"<tr><td>{m.rank}</td><td>{html.escape(m.key)}</td><td>{m.d:.4f} / {e.d:.4f}</td>"
                        f"<td>{m.d_hat:.4f} / {e.d_hat:.4f}</td><td>{html.escape(top_rt)}<br>"
                        f"<i>{html.escape(top_pt)}</i></td></tr>")
        same_order += [data.gallery[j].path.name for j in torch_rank[n]] == [Path(m.path).name for m in result.matches]
        # A valid top-k under PyTorch's distances (near-ties may swap places at float rounding).
        kth = float(torch_dist[n, torch_rank[n, -1]])
        valid += all(e.d <= kth * (1 + 1e-4) for e in torch_side) and len(torch_side) == min(k, len(data.gallery))
        name = f"runtime/{n:02d}"
        torch_side[0].figure(out / f"{name}_pytorch.png")
        result.matches[0].figure(out / f"{name}_runtime.png")
        sections.append(
            f"<h3>Query {html.escape(q.path.name)}</h3><table><tr><th>rank</th><th>gallery entry</th>"
            f"<th>d runtime / PyTorch</th><th>d̂ runtime / PyTorch</th><th>largest shares: runtime / <i>PyTorch</i>"
            f"</th></tr>{''.join(rows)}</table><p>Best hit explained by the runtime (left) and by PyTorch (right):</p>"
            f'<img src="{name}_runtime.png" width="49%"> <img src="{name}_pytorch.png" width="49%">')
    timings["runtime vs PyTorch comparison"] = time.perf_counter() - t0
    agreement = {"queries": len(queries), "k": k, "same_top_k_order": same_order, "valid_top_k": valid,
                 "max_rel_diff_d": worst["d"], "max_rel_diff_d_hat": worst["d_hat"],
                 "max_abs_diff_share": worst["shares"]}
    intro = (f"<p>The interpreter exported to ONNX (portable, float32), the {indexed} images of bounding_box_test "
             f"(the evaluation gallery's {len(data.gallery)} and the junk images it leaves out) indexed by "
             f"<code>attrimeter.runtime</code> (ONNX Runtime on the CPU, no PyTorch; attribute embeddings stored "
             f"in float16) and searched with FAISS for {len(queries)} queries, k = {k}. Each row: the runtime's "
             f"numbers, then PyTorch's eager explanation of the same pair. The runtime's top {k} are PyTorch's top {k} "
             f"by d (ties within 1e-4) for {valid} of {len(queries)} queries, in the same order for {same_order}; "
             f"largest relative difference of d "
             f"{worst['d']:.1e}, of d̂ {worst['d_hat']:.1e}; largest difference of a share {worst['shares']:.1e}."
             "</p>")
    return intro + "".join(sections), agreement, timings


def run_demo(out: str | Path = "runs/demo", progress: bool = True, queries: int = 8, top_k: int = 8,
             explained: int = 4, runtime_queries: int = 3, runtime_k: int = 5) -> Path:
    """Run the whole CPU pipeline and write ``report.html``, ``metrics.json``, ``metrics.md`` and pictures in ``out``.

    Synthetic data → target (quick) → interpreter (quick) and its two ablations on the same cached frozen features →
    evaluation → export (portable ONNX) → gallery index and explained search with the torch-free runtime, compared
    with PyTorch (``runtime.json``) → report. The synthetic data set is reused when ``out/data`` already holds one
    made with the same settings.

    Args:
        out: Run folder.
        progress: Show progress bars.
        queries: Queries shown in the ranking figure.
        top_k: Gallery images per query in the figure.
        explained: Queries whose best match and hardest non-match are explained in pictures.
        runtime_queries: Queries searched with the exported model in the torch-free runtime.
        runtime_k: Hits per runtime query.

    Returns:
        Path of the HTML report.
    """
    import torch

    from attrimeter.config import apply_overrides, resolve
    from attrimeter.data.formats import load_dataset
    from attrimeter.data.synth import SynthConfig, generate
    from attrimeter.engine.evaluation import euclidean_distances
    from attrimeter.engine.feature_cache import cache_features
    from attrimeter.engine.interpreter_checkpoint import load_interpreter
    from attrimeter.engine.interpreter_evaluation import evaluate_interpreter, evaluation_cache
    from attrimeter.engine.interpreter_training import PROFILES as INTERPRETER_PROFILES
    from attrimeter.engine.interpreter_training import InterpreterTrainConfig, train_interpreter
    from attrimeter.engine.metrics_table import metrics_markdown
    from attrimeter.engine.target import PROFILES, TargetTrainConfig, load_target, train_target
    from attrimeter.explain import Interpreter
    from attrimeter.models.interpreter import AttriMeter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    generate(data_dir, SynthConfig(**DEMO_SYNTH), progress=progress)
    timings["synthetic data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    config = resolve(TargetTrainConfig(), PROFILES, "quick")
    # Not evaluated here: every interpreter evaluation below also reports the target's retrieval.
    log = train_target(data_dir, out / "target", config, progress=progress, evaluate=False)
    data = load_dataset(data_dir)
    target_path = out / "target" / "target.pt"
    ck = load_target(target_path)
    timings["target training"] = time.perf_counter() - t0

    # The frozen part (shared stages, the target's feature maps) is computed once for the model and both ablations;
    # the target's own embeddings for the pictures come from it too.
    t0 = time.perf_counter()
    icfg = resolve(InterpreterTrainConfig(), INTERPRETER_PROFILES, "quick")
    grafted = AttriMeter(ck.model, len(data.schema), shared=icfg.shared, classifier=icfg.classifier)
    train_cache = cache_features(grafted, data.train, ck.image_size, flip=icfg.flip > 0, progress=progress,
                                 desc="cache train")
    eval_cache = evaluation_cache(grafted, data, ck.image_size, progress=progress)
    with torch.no_grad():
        qf_all = ck.model.embed(eval_cache.query.features).numpy()
        gf = ck.model.embed(eval_cache.gallery.features).numpy()
    timings["frozen features (once)"] = time.perf_counter() - t0
    runs: dict[str, dict] = {}
    logs: dict[str, dict] = {}
    for i, (name, overrides) in enumerate(ABLATIONS.items()):
        t0 = time.perf_counter()
        run_dir = out / ("interpreter" if i == 0 else f"ablation_{i}")
        logs[name] = train_interpreter(data_dir, target_path, run_dir, apply_overrides(icfg, overrides, source=name),
                                       progress=progress, cache=train_cache)
        trained = load_interpreter(run_dir / "interpreter.pt")
        runs[name] = evaluate_interpreter(trained.model, data, ck.image_size, cache=eval_cache, progress=progress)
        timings[f"interpreter: {name} (training + evaluation)"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(runs["AttriMeter"], indent=2))
    (out / "ablation.json").write_text(json.dumps(runs, indent=2))
    (out / "metrics.md").write_text(metrics_markdown(runs))

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(len(data.query), size=min(queries, len(data.query)), replace=False))
    qs = [data.query[i] for i in picks]
    dist = euclidean_distances(qf_all[picks], gf)
    ranked, correct = [], []
    for q, row in zip(qs, dist, strict=True):
        order = [j for j in np.argsort(row, kind="stable")
                 if not (data.gallery[j].pid == q.pid and data.gallery[j].camid == q.camid)][:top_k]
        ranked.append([data.gallery[j].path for j in order])
        correct.append([data.gallery[j].pid == q.pid for j in order])
    ranking_figure([q.path for q in qs], ranked, correct, out / "ranking.png")

    explainer = Interpreter(out / "interpreter" / "interpreter.pt")
    (out / "explained").mkdir(exist_ok=True)
    pictures = []
    for n, (q, g, kind) in enumerate(_explained_pairs(data, qf_all, gf, explained)):
        e = explainer.explain(q.path, g.path)
        name = f"explained/{n:02d}_{kind}.png"
        e.figure(out / name)
        top = ", ".join(f"{s.title} {100 * s.share:.0f}%" for s in e.top(3))
        pictures.append((name, f"{kind}: query {q.path.name} vs gallery {g.path.name}; d = {e.d:.2f}, "
                               f"d̂ = {e.d_hat:.2f}; largest shares: {top}"))
    timings["pictures"] = time.perf_counter() - t0
    runtime_html, agreement, runtime_timings = _runtime_search(out, data, explainer, qf_all, gf, runtime_queries,
                                                               runtime_k, progress)
    timings.update(runtime_timings)
    (out / "runtime.json").write_text(json.dumps(agreement, indent=2))
    report = out / "report.html"
    report.write_text(_report_html(runs, log, logs["AttriMeter"], timings, "ranking.png", pictures, runtime_html))
    return report
