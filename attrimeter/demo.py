"""The main job, ``attrimeter demo``: synthetic data → target training → evaluation → HTML report, on the CPU."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

__all__ = ["DEMO_SYNTH", "ranking_figure", "run_demo"]

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


def _report_html(metrics: dict, train_log: dict, timings: dict[str, float], figure: str) -> str:
    t = metrics["target"]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in t.items() if isinstance(v, float)
    )
    steps = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>AttriMeter demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:left}}</style></head><body>
<h1>AttriMeter demo</h1>
<p>Synthetic pedestrians ({train_log['train_ids']} train identities, {train_log['train_images']} train images),
target ReID model trained on the CPU for {train_log['iterations']} iterations ({train_log['epochs']:.1f} epochs),
evaluated under the Market-1501 protocol ({t['num_queries']} queries).</p>
<h2>Target retrieval</h2><table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<h2>Ranked lists</h2><p>Each row: a query, then its top-ranked gallery images (green: same identity, red: another
identity; same-camera matches are excluded by the protocol).</p><img src="{html.escape(figure)}" alt="ranked lists">
<h2>Timings</h2><table>{steps}</table></body></html>
"""


def run_demo(out: str | Path = "runs/demo", progress: bool = True, queries: int = 8, top_k: int = 8) -> Path:
    """Run the whole CPU pipeline and write ``report.html``, ``metrics.json`` and ``ranking.png`` in ``out``.

    The synthetic data set is reused when ``out/data`` already holds one made with the same settings.

    Args:
        out: Run folder.
        progress: Show progress bars.
        queries: Queries shown in the ranking figure.
        top_k: Gallery images per query in the figure.

    Returns:
        Path of the HTML report.
    """
    from attrimeter.config import resolve
    from attrimeter.data.formats import load_dataset
    from attrimeter.data.synth import SynthConfig, generate
    from attrimeter.engine.evaluation import euclidean_distances
    from attrimeter.engine.target import PROFILES, TargetTrainConfig, embed_and_rank, load_target, train_target

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    generate(data_dir, SynthConfig(**DEMO_SYNTH), progress=progress)
    timings["synthetic data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    config = resolve(TargetTrainConfig(), PROFILES, "quick")
    # Evaluated here rather than inside train_target: the ranking picture reuses the same embeddings.
    log = train_target(data_dir, out / "target", config, progress=progress, evaluate=False)
    data = load_dataset(data_dir)
    ck = load_target(out / "target" / "target.pt")
    rank, qf_all, gf = embed_and_rank(ck.model, data, ck.image_size, progress=progress)
    timings["target training + evaluation"] = time.perf_counter() - t0
    metrics = {"target": rank.as_dict()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # A picture of what the numbers mean: a few queries and their ranked galleries.
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(len(data.query), size=min(queries, len(data.query)), replace=False))
    qs = [data.query[i] for i in picks]
    qf = qf_all[picks]
    dist = euclidean_distances(qf, gf)
    ranked, correct = [], []
    for q, row in zip(qs, dist, strict=True):
        order = [j for j in np.argsort(row, kind="stable")
                 if not (data.gallery[j].pid == q.pid and data.gallery[j].camid == q.camid)][:top_k]
        ranked.append([data.gallery[j].path for j in order])
        correct.append([data.gallery[j].pid == q.pid for j in order])
    ranking_figure([q.path for q in qs], ranked, correct, out / "ranking.png")
    report = out / "report.html"
    report.write_text(_report_html(metrics, log, timings, "ranking.png"))
    return report
