"""The README's "Real data" path: a fast-reid / torchreid checkpoint -> ``import-target`` -> ``train`` -> ``evaluate``,
on small synthetic folders in the Market-1501 layout and in the DukeMTMC-reID layout with the official file's quirks.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reid_checkpoints import fastreid_checkpoint, random_neck, random_source, torchreid_checkpoint

from attrimeter.cli import main
from attrimeter.data.attribute_mat import write_attribute_mat
from attrimeter.data.errors import UnknownAttributeWarning
from attrimeter.data.formats import SPLIT_FOLDERS, list_images, load_dataset
from attrimeter.data.schema import DUKEMTMC, UNKNOWN
from attrimeter.engine.interpreter_checkpoint import load_interpreter
from attrimeter.engine.target import load_target


def duke_copy(market: Path, root: Path, rng: np.random.Generator) -> tuple[Path, list[int]]:
    """A Market-layout folder rewritten in the DukeMTMC-reID layout, with a ``duke_attribute.mat`` like the official
    one: ``top`` coded 0 for two training identities, two lower-body colours for a test identity."""
    frame = 0
    for folder in SPLIT_FOLDERS.values():
        (root / folder).mkdir(parents=True)
        for s in list_images(market / folder, "market1501"):
            tag = "-1" if s.pid == -1 else f"{s.pid:04d}"
            shutil.copy(s.path, root / folder / f"{tag}_c{s.camid + 1}_f{frame:07d}.jpg")
            frame += 1
    data = load_dataset(market, attributes=False)
    test_pids = sorted({s.pid for s in data.query + data.gallery if s.pid > 0})

    def labels(pids):
        return {p: rng.integers(0, 2, len(DUKEMTMC)).astype(np.int8) for p in pids}

    train, test = labels(data.train_pids), labels(test_pids)
    unknown = data.train_pids[:2]
    for pid in unknown:
        train[pid][DUKEMTMC.index("top")] = UNKNOWN
    colours = [DUKEMTMC.index(n) for n in DUKEMTMC.groups["lower-body colour"]]
    test[test_pids[0]][colours] = [1, 1] + [0] * (len(colours) - 2)
    write_attribute_mat(root / "duke_attribute.mat", DUKEMTMC, train, test)
    return root, unknown


def _train_and_evaluate(data: Path, target: Path, run: Path, settings: dict) -> dict:
    sets = [f"{k}={v}" for k, v in settings.items()]
    assert main(["train", "--data", str(data), "--target", str(target), "--out", str(run), "-q", "--set", *sets]) == 0
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(run / "interpreter.pt"), "-q", "--device", "cpu",
                 "--out", str(run / "metrics.json")]) == 0
    return json.loads((run / "metrics.json").read_text())


def test_fastreid_checkpoint_is_explained_on_a_duke_folder_with_zero_codes(tiny_data, tiny_settings, tmp_path, rng,
                                                                          capsys):
    source = random_source("resnet18", last_stride=1)
    neck = random_neck(source.num_features, torch.Generator().manual_seed(int(rng.integers(2**31))))
    fastreid_checkpoint(tmp_path / "model_final.pth", source, "gem_p", neck)
    assert main(["import-target", str(tmp_path / "model_final.pth"), "--out", str(tmp_path / "target"),
                 "--arch", "resnet18", "--size", "64x32"]) == 0
    assert "imported fast-reid resnet18 (GeM p=2.7, BN-neck, last stride 1" in capsys.readouterr().out
    target = tmp_path / "target" / "target.pt"
    duke, unknown = duke_copy(tiny_data, tmp_path / "DukeMTMC-reID", rng)

    with pytest.warns(UnknownAttributeWarning, match=rf"'train' struct, attribute 'top': identities {unknown[0]} "
                                                     rf"\(code 0\), {unknown[1]} \(code 0\)"):
        metrics = _train_and_evaluate(duke, target, tmp_path / "run", tiny_settings)
    assert set(metrics["interpreter"]) >= {"mAP", "x_map_e", "x_map_c", "adre", "attr_acc"}
    assert all(math.isfinite(v) for group in metrics.values() for v in group.values())
    ck = load_interpreter(tmp_path / "run" / "interpreter.pt")
    assert ck.meta["schema"] == "dukemtmc" and len(ck.attribute_names) == 23
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():  # the interpreter decomposes the imported model's own distance
        assert torch.allclose(ck.model(x).target, load_target(target).model(x), atol=1e-5)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(duke), "--target", str(target), "--out", str(tmp_path / "strict"), "-q",
              "--strict-attributes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(duke / "duke_attribute.mat") in err and "'top'" in err and "expected code 1 or 2" in err


def test_torchreid_checkpoint_is_explained_on_a_market_folder(tiny_data, tiny_settings, tmp_path):
    torchreid_checkpoint(tmp_path / "model.pth.tar-60", random_source("resnet18", last_stride=2))
    assert main(["import-target", str(tmp_path / "model.pth.tar-60"), "--out", str(tmp_path / "target"),
                 "--arch", "resnet18", "--size", "64x32", "-q"]) == 0
    metrics = _train_and_evaluate(tiny_data, tmp_path / "target" / "target.pt", tmp_path / "run", tiny_settings)
    assert {"cf_top1", "x_map_e", "attr_acc"} <= set(metrics["interpreter"])
    assert all(math.isfinite(v) for group in metrics.values() for v in group.values())
