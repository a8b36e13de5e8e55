import subprocess
import sys

import pytest

from attrimeter.cli import build_parser, main


def test_import_does_not_pull_torch():
    code = ("import sys, attrimeter, attrimeter.cli, attrimeter.config, attrimeter.data.schema, "
            "attrimeter.engine.evaluation, attrimeter.engine.explanation_metrics, attrimeter.viz, "
            "attrimeter.kernels, attrimeter.runtime, attrimeter.export, attrimeter.export.manifest, "
            "attrimeter.export.aot, attrimeter.export.tensorrt_engine; "
            "print('torch' in sys.modules or 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them only here
    assert {"synth", "train-target", "evaluate-target", "train", "evaluate", "explain", "export", "models",
            "schemas", "demo"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: attrimeter " + name in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "attrimeter", "schemas", "dukemtmc"], capture_output=True,
                         text=True, check=True)
    assert "dukemtmc: 23 attributes" in out.stdout and "light shoes" in out.stdout


def test_bad_arguments_are_reported_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", "--out", str(tmp_path), "--size", "12by4"])
    assert e.value.code == 2
    assert "size must look like 128x64" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["evaluate-target", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nope.pt" in err and "Traceback" not in err
