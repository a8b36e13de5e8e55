import json

from PIL import Image

from attrimeter import demo
from attrimeter.engine import target


def test_demo_writes_metrics_picture_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SYNTH", {"ids": 16, "cams": 3, "size": (64, 32), "seed": 3, "images_per_id": 6})
    monkeypatch.setitem(target.PROFILES, "quick", {"arch": "resnet18", "width": 0.25, "image_size": (64, 32),
                                                   "p_ids": 4, "k_instances": 2, "epochs": 1, "threads": 1})
    report = demo.run_demo(tmp_path, progress=False, queries=3, top_k=4)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["target"]
    assert 0.0 <= metrics["mAP"] <= 1.0 and 0.0 <= metrics["rank1"] <= 1.0 and metrics["num_queries"] > 0
    with Image.open(tmp_path / "ranking.png") as im:
        # One row per query: the query and its 4 ranked crops shown at 128x64, 3 px frames, a 12 px gap, drawn at 2x.
        assert im.format == "PNG" and im.size == (2 * (5 * 70 + 12), 2 * 3 * 134)
    html = report.read_text()
    assert f"{metrics['mAP']:.4f}" in html and "ranking.png" in html
