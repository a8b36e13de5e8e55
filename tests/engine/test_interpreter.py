import json

import numpy as np
import pytest
import torch

from attrimeter.cli import main
from attrimeter.config import ConfigError
from attrimeter.data.formats import load_dataset
from attrimeter.data.truth import read_counterfactual_pairs
from attrimeter.engine.interpreter_checkpoint import load_interpreter
from attrimeter.engine.interpreter_evaluation import evaluate_checkpoint
from attrimeter.engine.interpreter_training import InterpreterTrainConfig, train_interpreter
from attrimeter.engine.metrics_table import metrics_markdown

METRIC_KEYS = {"mAP", "rank1", "rank5", "rank10", "x_map_e", "x_map_c", "adre", "cf_top1", "cf_mrr", "attr_acc",
               "max_share", "share_entropy", "cf_share", "cf_lift", "prior_met"}


def test_batch_loss_pairs_match_cdist_and_stay_finite_at_duplicates():
    from attrimeter.engine.interpreter_training import _batch_loss
    from attrimeter.models import create_model
    from attrimeter.models.interpreter import AttriMeter

    model = AttriMeter(create_model("resnet18", num_classes=3, width=0.25).eval(), 4, shared="layer3")
    torch.nn.init.normal_(model.head[2].weight, std=0.3)
    x = torch.rand(5, 3, 64, 32)
    x[4] = x[0]  # the same image twice in a batch (PK sampling with replacement does this)
    shared = model.shared_features(x)
    features = model.target_features(shared)
    labels = torch.randint(0, 2, (5, 4))
    model.train()
    loss, parts = _batch_loss(model, shared, features, labels, torch.full((4,), 0.5), InterpreterTrainConfig(), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    emb = model.from_shared(shared, features).stacked().detach().double()
    dist = torch.stack([torch.cdist(emb[:, r], emb[:, r]) for r in range(5)])
    i, j = torch.triu_indices(5, 5, offset=1)
    expected = (dist[0, i, j] - dist[1:, i, j].mean(0)).abs().mean()
    # The GEMM form is exact to ~sqrt(eps * |a|^2) per distance (cancellation at the duplicate pair), as the kernel
    # contract says.
    bound = 4 * (torch.finfo(torch.float32).eps * emb.square().sum(-1).max()).sqrt()
    assert float(parts["distill"]) == pytest.approx(float(expected), rel=1e-5, abs=float(bound))


def test_batch_loss_leaves_unknown_labels_out():
    from attrimeter.engine.interpreter_training import _batch_loss
    from attrimeter.engine.losses import attribute_prior, weighted_bce
    from attrimeter.kernels.attr_distance import attr_distance_reference
    from attrimeter.models import create_model
    from attrimeter.models.interpreter import AttriMeter

    model = AttriMeter(create_model("resnet18", num_classes=3, width=0.25).eval(), 4, shared="layer3").train()
    torch.nn.init.normal_(model.head[2].weight, std=0.3)  # non-uniform shares: the prior is not trivially 0
    x = torch.rand(5, 3, 64, 32)
    shared = model.shared_features(x)
    features = model.target_features(shared)
    ratio = torch.full((4,), 0.3)
    config = InterpreterTrainConfig()
    with torch.no_grad():
        # Nothing known: no prior and no BCE, only distillation.
        _, parts = _batch_loss(model, shared, features, torch.full((5, 4), -1), ratio, config, 1.0)
        assert float(parts["prior"]) == 0.0 and float(parts["bce"]) == 0.0 and float(parts["distill"]) >= 0.0
        # Identity 0's attribute 2 unknown: its pairs leave attribute 2 out of e and 1 - e.
        labels = torch.randint(0, 2, (5, 4))
        labels[0, 2] = -1
        _, parts = _batch_loss(model, shared, features, labels, ratio, config, 1.0)
        emb = model.from_shared(shared, features).stacked()
        i, j = torch.triu_indices(5, 5, offset=1)
        shares = attr_distance_reference(emb, emb).shares[i, j]
        known = torch.ones(len(i), 4, dtype=torch.bool)
        known[i == 0, 2] = False
        expected = attribute_prior(shares, (labels[i] != labels[j]).float(), known)
        assert float(parts["prior"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(parts["prior"]) != pytest.approx(float(attribute_prior(shares, (labels[i] != labels[j]).float())),
                                                      rel=1e-5)
        logits = model.from_shared(shared, features).attr_logits
        assert float(parts["bce"]) == pytest.approx(float(weighted_bce(logits, labels, ratio)), rel=1e-5)


def test_evaluation_metrics_shape_and_ranges(tiny_data, tiny_interpreter):
    metrics = evaluate_checkpoint(tiny_interpreter, tiny_data, progress=False, device="cpu")
    assert set(metrics) == {"target", "interpreter", "paper", "localisation", "pointing_by_attribute",
                            "mass_by_attribute"}
    assert set(metrics["target"]) == {"mAP", "rank1", "rank5", "rank10"}
    assert set(metrics["interpreter"]) == METRIC_KEYS
    for key, value in metrics["interpreter"].items():
        assert np.isfinite(value)
        assert 0.0 <= value <= (np.inf if key in ("adre", "cf_lift") else 1.0), key
    assert set(metrics["paper"]) == {"x_map_e", "x_map_c", "adre", "pairs"}
    assert 0.0 <= metrics["paper"]["x_map_e"] <= 1.0 and 0.0 <= metrics["paper"]["x_map_c"] <= 1.0
    assert set(metrics["pointing_by_attribute"]) <= set(load_dataset(tiny_data).schema.names)
    assert all(0.0 <= v <= 1.0 for v in metrics["pointing_by_attribute"].values())
    table = metrics_markdown({"run": metrics})
    assert "ADRE (%)" in table and f"{metrics['interpreter']['x_map_e']:.4f}" in table


def test_checkpoint_is_self_contained_and_reproduces_the_target(tiny_data, tiny_target, tiny_interpreter):
    from attrimeter.engine.target import load_target

    ck = load_interpreter(tiny_interpreter)
    target = load_target(tiny_target).model
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        out = ck.model(x)
        assert torch.allclose(out.target, target(x), atol=1e-5)
    assert ck.attribute_names == list(load_dataset(tiny_data).schema.names)
    assert ck.image_size == (64, 32)


def test_resume_continues_where_it_stopped(tiny_data, tiny_target, tiny_settings, tmp_path):
    first = train_interpreter(tiny_data, tiny_target, tmp_path, InterpreterTrainConfig(**tiny_settings),
                              progress=False)
    assert (tmp_path / "interpreter_last.pt").is_file()
    config = InterpreterTrainConfig(**{**tiny_settings, "epochs": 2})
    second = train_interpreter(tiny_data, tiny_target, tmp_path, config, progress=False, resume=True)
    assert second["iterations"] == 2 * first["iterations"]
    with pytest.raises(ValueError, match="changed shared"):
        train_interpreter(tiny_data, tiny_target, tmp_path, InterpreterTrainConfig(**{**tiny_settings,
                          "shared": "layer3"}), progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_interpreter(tiny_data, tiny_target, tmp_path / "new", config, progress=False, resume=True)


def test_training_without_cache_and_with_other_classifier(tiny_data, tiny_target, tiny_settings, tmp_path):
    config = InterpreterTrainConfig(**{**tiny_settings, "cache": False, "classifier": "map", "shared": "layer3"})
    log = train_interpreter(tiny_data, tiny_target, tmp_path, config, progress=False)
    assert log["iterations"] > 0 and not log["cached"]
    ck = load_interpreter(tmp_path / "interpreter.pt")
    assert ck.model.classifier == "map" and ck.model.late_stages == ("layer4",)
    assert all(np.isfinite(v) for e in log["losses"] for v in e.values())


def test_training_refuses_data_without_attributes(tiny_data, tiny_target, tiny_settings, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_data, plain, ignore=shutil.ignore_patterns("*.mat"))
    with pytest.raises(Exception, match="market_attribute.mat"):
        train_interpreter(plain, tiny_target, tmp_path / "run", InterpreterTrainConfig(**tiny_settings),
                          progress=False)


@pytest.mark.parametrize("overrides, message", [
    ({"prior_weight": -1.0}, "loss weights"), ({"flip": 2.0}, "flip"), ({"epochs": 0}, "epochs"),
])
def test_config_ranges_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        InterpreterTrainConfig(**overrides)


def test_load_interpreter_names_wrong_files(tiny_target, tmp_path):
    with pytest.raises(ValueError, match="target checkpoint"):
        load_interpreter(tiny_target)
    with pytest.raises(FileNotFoundError):
        load_interpreter(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_interpreter(bad)


def test_counterfactual_pairs_are_read(tiny_data, tmp_path):
    names = list(load_dataset(tiny_data).schema.names)
    a, b, changed, named = read_counterfactual_pairs(tiny_data, names)
    assert len(a) == len(b) == len(changed) == len(named) == 2 * len(names)
    assert all(changed[i, names.index(n)] for i, n in enumerate(named))
    assert all(p.is_file() for p in a + b)
    with pytest.raises(FileNotFoundError, match="pairs.csv"):
        read_counterfactual_pairs(tmp_path, names)


def test_cli_train_evaluate_explain(tiny_data, tiny_target, tiny_settings, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [f"{k}={v}" for k, v in tiny_settings.items()]
    assert main(["train", "--data", str(tiny_data), "--target", str(tiny_target), "--out", str(run), "-q",
                 "--set", *sets]) == 0
    assert main(["evaluate", "--data", str(tiny_data), "--checkpoint", str(run / "interpreter.pt"), "-q",
                 "--out", str(run / "metrics.json")]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["interpreter"]) == METRIC_KEYS and (run / "metrics.md").is_file()
    capsys.readouterr()
    query = next((tiny_data / "query").glob("*.jpg"))
    gallery = next((tiny_data / "bounding_box_test").glob("0*.jpg"))
    assert main(["explain", str(query), str(gallery), "--checkpoint", str(run / "interpreter.pt"),
                 "--out", str(run / "fig.png"), "--json"]) == 0
    explanation = json.loads(capsys.readouterr().out)["matches"][0]
    contributions = sum(a["contribution"] for a in explanation["attributes"])
    assert contributions == pytest.approx(explanation["d"], rel=1e-5)
    assert (run / "fig.png").stat().st_size > 0


def test_cli_explain_reports_a_missing_image(tiny_interpreter, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--checkpoint", str(tiny_interpreter)])
    assert exit_info.value.code == 2
    assert "image not found" in capsys.readouterr().err


def test_cached_and_streamed_evaluation_agree(tiny_data, tiny_interpreter):
    from attrimeter.engine.interpreter_evaluation import evaluate_interpreter, evaluation_cache

    ck = load_interpreter(tiny_interpreter)
    data = load_dataset(tiny_data)
    streamed = evaluate_interpreter(ck.model, data, ck.image_size, progress=False)
    cached = evaluate_interpreter(ck.model, data, ck.image_size, evaluation_cache(ck.model, data, ck.image_size,
                                                                                  progress=False), progress=False)
    for group in ("target", "interpreter"):
        for key, value in streamed[group].items():
            assert cached[group][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (group, key)


def test_evaluation_refuses_identities_without_attributes(tiny_data, tiny_interpreter):
    ck = load_interpreter(tiny_interpreter)
    data = load_dataset(tiny_data)
    data.attributes.pop(data.query[0].pid)
    from attrimeter.engine.interpreter_evaluation import evaluate_interpreter

    with pytest.raises(ValueError, match=f"e.g. \\[{data.query[0].pid}"):
        evaluate_interpreter(ck.model, data, ck.image_size, progress=False)


def test_interpreter_on_a_non_resnet_target(tiny_data, tiny_settings, tmp_path):
    from attrimeter.engine.target import TargetTrainConfig, train_target

    target_cfg = TargetTrainConfig(arch="mobilenetv2", width=0.25, image_size=(64, 32), p_ids=4, k_instances=2,
                                   epochs=1, threads=1)
    train_target(tiny_data, tmp_path / "target", target_cfg, progress=False, evaluate=False)
    train_interpreter(tiny_data, tmp_path / "target" / "target.pt", tmp_path / "run",
                      InterpreterTrainConfig(**{**tiny_settings, "shared": "layer3"}), progress=False)
    metrics = evaluate_checkpoint(tmp_path / "run" / "interpreter.pt", tiny_data, progress=False, device="cpu")
    assert metrics["interpreter"]["adre"] >= 0 and 0 <= metrics["interpreter"]["x_map_e"] <= 1


def test_same_config_trains_the_same_model_twice(tiny_data, tiny_target, tiny_settings, tmp_path):
    # Budgets are iterations and every random source is seeded from the config: two runs are bit-identical, and
    # another seed gives another model.
    settings = {**tiny_settings, "epochs": 6, "classifier": "map", "colour_weight": 1.0, "max_minutes": 30.0}
    runs = {"a": settings, "b": settings, "seed 1": {**settings, "seed": 1}}
    logs = {name: train_interpreter(tiny_data, tiny_target, tmp_path / name, InterpreterTrainConfig(**cfg),
                                    progress=False) for name, cfg in runs.items()}
    assert logs["a"]["iterations"] == logs["b"]["iterations"] >= 10  # losses are logged every 10 iterations
    assert logs["a"]["stopped_early"] is None
    assert logs["a"]["losses"] == logs["b"]["losses"] and logs["a"]["losses"]
    weights = {name: load_interpreter(tmp_path / name / "interpreter.pt").model.state_dict() for name in runs}
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["seed 1"][k]) for k in weights["a"])
