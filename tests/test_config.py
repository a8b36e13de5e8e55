from dataclasses import dataclass

import pytest

from attrimeter.config import ConfigError, apply_overrides, resolve, save_config


@dataclass(frozen=True)
class Cfg:
    arch: str = "resnet18"
    lr: float = 1e-3
    epochs: int = 10
    size: tuple[int, int] = (128, 64)
    budget: float | None = None
    flag: bool = False


PROFILES = {"quick": {"epochs": 2, "budget": 1.5}}


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("lr: 0.01\nsize: [256, 128]\nepochs: 5\n")
    cfg = resolve(Cfg(), PROFILES, "quick", f, ["epochs=7", "flag=true", "lr=1e-3"])
    assert cfg == Cfg(lr=1e-3, epochs=7, size=(256, 128), budget=1.5, flag=True)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert resolve(Cfg(), yaml_file=tmp_path / "resolved.yaml") == cfg  # the saved config round-trips


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"lrr": 1}, "unknown config key 'lrr'"), ({"epochs": 1.5}, "expects an integer"),
     ({"size": [1, 2, 3]}, "list of 2"), ({"flag": "yes"}, "true/false"), ({"arch": 3}, "string")],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Cfg(), overrides, source="x.yaml")


def test_unknown_profile_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'slow'"):
        resolve(Cfg(), PROFILES, "slow")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml must hold a mapping"):
        resolve(Cfg(), yaml_file=bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        resolve(Cfg(), yaml_file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        resolve(Cfg(), assignments=["lr"])
