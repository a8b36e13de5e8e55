import json

from PIL import Image

from attrimeter import demo
from attrimeter.engine import interpreter_training, target


def test_demo_writes_metrics_pictures_and_report(tmp_path, monkeypatch, tiny_settings):
    monkeypatch.setattr(demo, "DEMO_SYNTH", {"ids": 16, "cams": 3, "size": (64, 32), "seed": 3, "images_per_id": 6,
                                             "counterfactual_per_attribute": 1})
    monkeypatch.setitem(target.PROFILES, "quick", {"arch": "resnet18", "width": 0.25, "image_size": (64, 32),
                                                   "p_ids": 4, "k_instances": 2, "epochs": 1, "threads": 1})
    quick = {**interpreter_training.PROFILES["quick"], **tiny_settings}
    monkeypatch.setitem(interpreter_training.PROFILES, "quick", quick)
    report = demo.run_demo(tmp_path, progress=False, queries=3, top_k=4, explained=2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"target", "interpreter", "paper", "localisation", "pointing_by_attribute",
                            "mass_by_attribute"}
    assert 0.0 <= metrics["localisation"]["pointing"] <= 1.0 and 0.0 <= metrics["interpreter"]["cf_share"] <= 1.0
    assert 0.0 <= metrics["target"]["mAP"] <= 1.0 and 0.0 <= metrics["interpreter"]["x_map_e"] <= 1.0
    ablation = json.loads((tmp_path / "ablation.json").read_text())
    assert list(ablation) == list(demo.ABLATIONS) and ablation["AttriMeter"] == metrics
    # The ablations really train differently: without the prior and without distillation the models differ.
    assert ablation["without attribute prior"]["interpreter"] != metrics["interpreter"]
    with Image.open(tmp_path / "ranking.png") as im:
        # One row per query: the query and its 4 ranked crops shown at 128x64, 3 px frames, a 12 px gap, drawn at 2x.
        assert im.format == "PNG" and im.size == (2 * (5 * 70 + 12), 2 * 3 * 134)
    pictures = sorted((tmp_path / "explained").glob("*.png"))
    assert 2 <= len(pictures) <= 4 and any("non-match" in p.name for p in pictures)
    html = report.read_text()
    assert f"{metrics['target']['mAP']:.4f}" in html and "ranking.png" in html
    assert "without metric distillation" in html and all(p.name in html for p in pictures)
    # The deployed model (ONNX Runtime, float16 attribute store) agrees with PyTorch on the explained searches.
    agreement = json.loads((tmp_path / "runtime.json").read_text())
    assert agreement["queries"] == 3 and agreement["valid_top_k"] == 3
    assert agreement["max_rel_diff_d"] < 1e-4 and agreement["max_rel_diff_d_hat"] < 5e-3
    assert agreement["max_abs_diff_share"] < 5e-3
    runtime_pictures = sorted((tmp_path / "runtime").glob("*.png"))
    assert len(runtime_pictures) == 6 and all(f"runtime/{p.name}" in html for p in runtime_pictures)
    assert "Explained search with the deployed model" in html
