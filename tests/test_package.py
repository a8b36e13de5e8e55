import ast
import subprocess
import sys
from pathlib import Path

import pytest

from attrimeter.cli import build_parser, main


def test_import_does_not_pull_torch():
    code = ("import sys, attrimeter, attrimeter.cli, attrimeter.config, attrimeter.data.schema, "
            "attrimeter.engine.evaluation, attrimeter.engine.explanation_metrics, attrimeter.viz, "
            "attrimeter.kernels, attrimeter.runtime, attrimeter.export, attrimeter.artefact.manifest, "
            "attrimeter.artefact.kernels, attrimeter.artefact.device, attrimeter.export.aot, "
            "attrimeter.export.tensorrt_engine; "
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


def test_the_runtime_reads_exports_through_the_artefact_module_only():
    """runtime/ imports nothing of attrimeter.export and no private name of another package."""

    problems = []
    for path in sorted((Path(__file__).resolve().parents[1] / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("attrimeter.export"):
                    problems.append(f"{path.name}: from {node.module}")
                elif node.module.startswith("attrimeter.") and not node.module.startswith("attrimeter.runtime"):
                    problems += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                problems += [f"{path.name}: import {a.name}" for a in node.names
                             if a.name.startswith("attrimeter.export")]
    assert problems == []
    code = ("import sys, attrimeter.runtime.runtime, attrimeter.runtime.app, attrimeter.runtime.server, "
            "attrimeter.runtime.cuda_kernels, attrimeter.runtime.tensorrt_backend, attrimeter.runtime.device_index; "
            "print(sorted(m for m in sys.modules if m.startswith('attrimeter.export')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
