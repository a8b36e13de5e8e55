import json
import shutil

import pytest
import torch

from attrimeter.cli import main
from attrimeter.config import ConfigError, apply_overrides
from attrimeter.engine.target import (
    TargetTrainConfig,
    batch_hard_triplet,
    evaluate_target,
    load_target,
    train_target,
)


def test_batch_hard_triplet_matches_loops():
    feats = torch.randn(8, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    labels[-1] = 1  # every anchor has a positive
    d = torch.cdist(feats, feats)
    expected = []
    for i in range(8):
        pos = max(d[i, j] for j in range(8) if labels[j] == labels[i])
        neg = min(d[i, j] for j in range(8) if labels[j] != labels[i])
        expected.append(max(0.0, float(pos - neg + 0.3)))
    assert batch_hard_triplet(feats, labels, 0.3).item() == pytest.approx(sum(expected) / 8, rel=1e-6)
    soft = batch_hard_triplet(feats, labels, 0.0).item()
    assert soft > 0



def test_train_checkpoint_evaluate_roundtrip(tiny_data, tmp_path):
    cfg = TargetTrainConfig(arch="resnet18", width=0.25, image_size=(64, 32), p_ids=4, k_instances=2, epochs=2,
                            pad=2, threads=1)
    log = train_target(tiny_data, tmp_path / "run", cfg, progress=False)
    assert log["iterations"] == 2 * (log["train_ids"] // 4)
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["metrics"]["mAP"] == log["metrics"]["mAP"]
    ck = load_target(tmp_path / "run" / "target.pt")
    assert ck.image_size == (64, 32) and ck.meta["schema"] == "market1501"
    assert ck.model.config["arch"] == "resnet18"
    metrics = evaluate_target(tmp_path / "run" / "target.pt", tiny_data, progress=False)
    assert metrics.mAP == pytest.approx(log["metrics"]["mAP"], abs=1e-6)  # the checkpoint is the trained model
    # A plain Market-1501 download has no market_attribute.mat: a target does not need one.
    plain = tmp_path / "plain"
    shutil.copytree(tiny_data, plain, ignore=shutil.ignore_patterns("*.mat", "counterfactual", "synth.json"))
    assert evaluate_target(tmp_path / "run" / "target.pt", plain, progress=False).mAP == pytest.approx(metrics.mAP)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"epochs": 0}, "epochs must be >= 1"), ({"max_minutes": 0}, "max_minutes must be > 0"),
     ({"warmup_fraction": 1.0}, "warmup_fraction"), ({"image_size": (16, 8)}, "image_size"),
     ({"device": "tpu"}, "device must be")],
)
def test_config_ranges_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TargetTrainConfig(), overrides)


def test_cli_train_and_evaluate(tiny_data, tmp_path, capsys):
    run = tmp_path / "cli"
    assert main(["train-target", "--data", str(tiny_data), "--out", str(run), "-q", "--set", "width=0.25",
                 "image_size=[64,32]", "p_ids=4", "k_instances=2", "epochs=1", "max_minutes=null", "threads=1"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    assert main(["evaluate-target", "--data", str(tiny_data), "--checkpoint", str(run / "target.pt"), "-q",
                 "--out", str(run / "m.json")]) == 0
    assert 0.0 <= json.loads((run / "m.json").read_text())["target"]["mAP"] <= 1.0


def test_load_target_rejects_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an AttriMeter target checkpoint"):
        load_target(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.pt"):
        load_target(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="none.pt"):
        load_target(tmp_path / "none.pt")
