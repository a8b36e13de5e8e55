"""The C launcher library (CMakeLists.txt, export/csrc/): build, run against the torch references, malformed exports.

What runs where:
- Everywhere (no GPU needed): cmake configure + build; the program's skip (exit 77) without a driver; CTest wiring;
  the library's validation of launch.txt before the driver is touched (parameter order, columns, paths, cubins);
  argument checks; and the launch marshalling against a *mock* libcuda.so.1 (compiled here from cuda.h's own
  prototypes, so it exports the driver's versioned symbol names): grid, block, shared memory, stream, every
  parameter value in order, context push/pop balance, module/allocation leaks, target selection; and the test
  program end to end with the mock replaying the expected outputs (case format, output routing, comparisons).
  Also: launch.txt's export line (dtype, C, HW, M, p, eps) and am_get_info for float32 and float16 exports, the test
  program's case/export mismatch check and its float16 path (conversions, tolerance) on the mock, and the target
  fallback (sm_80 cubins on an sm_86 device; none for sm_90) against mock devices of chosen compute capability.
- With a GPU (torch.cuda.is_available()): the real kernels against the references, for (p, dtype) in (3, float32),
  (2.9, float32), (2.9, float16): ‖out − ref‖/‖ref‖ ≤ 1e-4, 2e-3 for the float16 pooling outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from clib_harness import CLIENT_SOURCE, EPS, MOCK_SOURCE, SHAPE, write_case

REPO = Path(__file__).resolve().parents[2]
# The exports checked against the references: (p, dtype). Integer p takes the kernel's multiplication path.
VARIANTS = {"p3-fp32": (3.0, "float32"), "p2.9-fp32": (2.9, "float32"), "p2.9-fp16": (2.9, "float16")}
DEFAULT = "p3-fp32"
# The header's return codes.
AM_OK, AM_ERR_NO_DRIVER, AM_ERR_NO_DEVICE, AM_ERR_NO_TARGET = 0, 1, 2, 3
AM_ERR_IO, AM_ERR_FORMAT, AM_ERR_CUDA, AM_ERR_ARG = 4, 5, 6, 7
GPU = torch.cuda.is_available()


def _cuda_include() -> Path | None:
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT")] + ["/usr/local/cuda"]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include"
    return None


def _c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: export (AOT kernels), test case (torch references), build (cmake), mock driver
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target() -> str:
    from attrimeter.export.aot import TARGETS

    if not GPU:
        return "sm_90"
    major, minor = torch.cuda.get_device_capability()
    name = f"sm_{major}{minor}"
    if name not in TARGETS:
        pytest.skip(f"attrimeter.export.aot cannot compile for this GPU's {name} (known: {', '.join(TARGETS)})")
    return name


def _export_line(p: float, dtype: str) -> str:
    return f"export dtype={dtype} C={SHAPE['C']} HW={SHAPE['HW']} M={SHAPE['M']} p={float(p)!r} eps={EPS!r}"


def _check_export_line(kernels: Path, line: str) -> None:
    """launch.txt's first data line says what the cubins were built for (written by aot.launch_table)."""
    lines = (kernels / "launch.txt").read_text().splitlines()
    first = next(x for x in lines if x.strip() and not x.lstrip().startswith("#"))
    assert first == line


@pytest.fixture(scope="module")
def exports(tmp_path_factory, target) -> dict[str, Path]:
    """One export per variant, for the device's target (sm_90 without a GPU), compiled side by side."""
    from attrimeter.export.aot import compile_kernels, kernel_specs

    folders = {name: tmp_path_factory.mktemp(f"export-{name}") for name in VARIANTS}

    def build(name: str) -> Path:
        p, dtype = VARIANTS[name]
        specs = kernel_specs(SHAPE["C"], SHAPE["HW"], SHAPE["M"], p, EPS, dtype)
        compile_kernels(folders[name] / "kernels", specs, (target,))
        _check_export_line(folders[name] / "kernels", _export_line(p, dtype))
        return folders[name]

    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        return dict(zip(VARIANTS, pool.map(build, VARIANTS), strict=True))


@pytest.fixture(scope="module")
def export_dir(exports) -> Path:
    return exports[DEFAULT]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    """One test case per variant (fresh inputs each)."""
    out = {}
    for seed, (name, (p, dtype)) in enumerate(VARIANTS.items()):
        out[name] = tmp_path_factory.mktemp(f"case-{name}")
        write_case(out[name], p, dtype, seed)
    return out


@pytest.fixture(scope="module")
def case_dir(cases) -> Path:
    return cases[DEFAULT]


@pytest.fixture(scope="module")
def clib(tmp_path_factory, export_dir, case_dir) -> dict[str, Path]:
    """Configure and build the C library and test program once (CTest is pointed at the export and the case)."""
    cmake, cc = shutil.which("cmake"), _c_compiler()
    if cmake is None:
        pytest.skip("cmake is not installed")
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang)")
    if _cuda_include() is None and shutil.which("nvcc") is None:
        pytest.skip("cuda.h not found (set CUDA_HOME): the C library needs the CUDA headers, not a GPU")
    build = tmp_path_factory.mktemp("build")
    configure = _run([cmake, "-S", REPO, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_C_COMPILER={cc}",
                      f"-DATTRIMETER_EXPORT_DIR={export_dir}", f"-DATTRIMETER_CASE_DIR={case_dir}"])
    assert configure.returncode == 0, configure.stdout + configure.stderr
    built = _run([cmake, "--build", build, "-j", "2"])
    assert built.returncode == 0, built.stdout + built.stderr
    return {"build": build, "lib": build / "libattrimeter_kernels.so", "prog": build / "attrimeter_kernels_test"}


@pytest.fixture(scope="module")
def client(tmp_path_factory, clib):
    """Run a ctypes scenario against the built library in a child process; returns its JSON result."""
    script = tmp_path_factory.mktemp("client") / "client.py"
    script.write_text(CLIENT_SOURCE)

    def run(export: Path, scenario: str, *args: str, env: dict[str, str] | None = None) -> dict:
        proc = _run([sys.executable, script, clib["lib"], export, scenario, *args], env={**os.environ, **(env or {})})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)

    return run


@pytest.fixture(scope="module")
def mock_driver(tmp_path_factory, clib) -> Path:
    """Folder holding the mock libcuda.so.1 (put it on LD_LIBRARY_PATH)."""
    include = _cuda_include()
    if include is None:
        pytest.skip("cuda.h not found (set CUDA_HOME) for the mock driver")
    folder = tmp_path_factory.mktemp("mockcuda")
    (folder / "mock.c").write_text(MOCK_SOURCE)
    built = _run([_c_compiler(), "-std=c11", "-shared", "-fPIC", "-Wall", "-Werror", "-isystem", include,
                  folder / "mock.c", "-Wl,-soname,libcuda.so.1", "-o", folder / "libcuda.so.1"])
    assert built.returncode == 0, built.stderr
    return folder


def _mock_env(mock_driver: Path, export: Path, target: str, log: Path, **extra: str) -> dict[str, str]:
    ld = os.pathsep.join(filter(None, [str(mock_driver), os.environ.get("LD_LIBRARY_PATH")]))
    return {"LD_LIBRARY_PATH": ld, "AM_MOCK_KERNELS": str(export / "kernels" / target), "AM_MOCK_LOG": str(log),
            **extra}


def _copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_table(export: Path, fn) -> None:
    path = export / "kernels" / "launch.txt"
    path.write_text(fn(path.read_text()))


# ---------------------------------------------------------------------------------------------------------------------
# Build and the real run
# ---------------------------------------------------------------------------------------------------------------------


def test_build_outputs(clib, tmp_path):
    assert clib["lib"].is_file() and os.access(clib["prog"], os.X_OK)
    if shutil.which("readelf"):
        dyn = _run(["readelf", "-d", clib["lib"]]).stdout
        assert "libcuda" not in dyn and "libcudart" not in dyn, dyn  # the driver is dlopen'ed at run time
        syms = _run(["readelf", "--dyn-syms", "-W", clib["lib"]]).stdout
        exported = set(re.findall(r"GLOBAL\s+DEFAULT\s+\d+\s+(am_\w+)", syms))
        assert exported == {"am_open", "am_close", "am_last_error", "am_target", "am_get_info", "am_masked_gem_pool",
                            "am_explain", "am_alloc", "am_free", "am_upload", "am_download", "am_memset32",
                            "am_synchronize"}
    installed = _run(["cmake", "--install", clib["build"], "--prefix", tmp_path / "prefix"])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (tmp_path / "prefix/include/attrimeter_kernels.h").is_file()
    assert list((tmp_path / "prefix").glob("lib*/libattrimeter_kernels.so*")), installed.stdout
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:  # DeepStream plugins are C++: the header must compile there too
        proc = _run([cxx, "-std=c++11", "-Wall", "-Wextra", "-pedantic", "-Werror", "-fsyntax-only", "-x", "c++",
                     REPO / "export" / "csrc" / "attrimeter_kernels.h"])
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_program_against_reference(clib, exports, cases, variant):
    proc = _run([clib["prog"], exports[variant], cases[variant]])
    out = proc.stdout + proc.stderr
    if GPU:
        assert proc.returncode == 0, out
        assert "PASSED" in out and "FAIL " not in out, out
        assert f"export dtype {VARIANTS[variant][1]} C 64 HW 32 M 5" in out, out
        tol = "2e-03" if VARIANTS[variant][1] == "float16" else "1e-04"
        assert re.search(rf"ok   masked_gem_pool f_k: rel err \S+ \(tol {tol}\)", out), out
    else:
        assert proc.returncode == 77, out
        assert out.startswith("SKIP: AM_ERR_NO_DRIVER") and "libcuda.so.1" in out, out


def test_ctest(clib):
    proc = _run(["ctest", "--output-on-failure"], cwd=clib["build"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "attrimeter_kernels" in out
    assert ("Passed" if GPU else "Skipped") in out, out


def test_usage(clib):
    proc = _run([clib["prog"]])
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.skipif(GPU, reason="checks the message on a machine without the CUDA driver")
def test_open_without_driver(client, export_dir):
    res = client(export_dir, "open")
    rc, msg = res["open"]
    assert rc == AM_ERR_NO_DRIVER and 'dlopen("libcuda.so.1")' in msg, res


def test_null_handle_and_bad_arguments(client, export_dir):
    res = client(export_dir, "args")
    for name in ("open_null_out", "open_null_dir", "open_negative_device", "pool", "explain", "alloc", "free",
                 "upload", "download", "memset32", "synchronize", "info_null"):
        rc, msg = res[name]
        assert rc == AM_ERR_ARG and msg, (name, res[name])
    assert "NULL" in res["pool"][1] and "negative" in res["open_negative_device"][1]
    assert res["alloc_ptr"] == 0 and res["target_null"] is None


# ---------------------------------------------------------------------------------------------------------------------
# launch.txt validation (before the driver: identical with and without a GPU)
# ---------------------------------------------------------------------------------------------------------------------


def test_tampered_parameter_order(clib, client, export_dir, case_dir, tmp_path, target):
    bad = _copy_export(export_dir, tmp_path / "export")
    _edit_table(bad, lambda s: s.replace("ids_ptr,d_ptr,dk_ptr", "ids_ptr,dk_ptr,d_ptr", 1))  # explain, not _weighted
    lines = (bad / "kernels" / "launch.txt").read_text().splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if f"{target} explain " in line)
    rc, msg = client(bad, "open")["open"]
    assert rc == AM_ERR_FORMAT, msg
    assert f"launch.txt:{lineno}" in msg and "parameter 4 is 'dk_ptr'" in msg and "passes 'd_ptr'" in msg, msg
    proc = _run([clib["prog"], bad, case_dir])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "AM_ERR_FORMAT" in proc.stderr and "'dk_ptr'" in proc.stderr and "'d_ptr'" in proc.stderr


def _drop_params(s: str, n: int) -> str:
    return re.sub(rf"(masked_gem_pool .*?)(,[a-z_]+){{{n}}}\n", r"\1\n", s, count=1)


MALFORMED = {
    "missing_launch_txt": (AM_ERR_IO, "launch.txt: No such file", None),
    "param_missing": (AM_ERR_FORMAT, "parameter 8 is '(none)' but this library passes 'profile_scratch'",
                      lambda s: _drop_params(s, 1)),
    "param_extra": (AM_ERR_FORMAT, "parameter 9 is 'extra' but this library passes '(none)'",
                    lambda s: s.replace("profile_scratch\n", "profile_scratch,extra\n", 1)),
    "extra_column": (AM_ERR_FORMAT, "expected 8 columns", lambda s: s.replace(" 128 ", " 128 7 ", 1)),
    "bad_threads": (AM_ERR_FORMAT, "threads 'many'", lambda s: s.replace(" 128 ", " many ", 1)),
    "bad_shared": (AM_ERR_FORMAT, "shared_bytes '-5'", lambda s: re.sub(r"( 128 )\d+ ", r"\1-5 ", s, count=1)),
    "bad_target": (AM_ERR_FORMAT, "not of the form sm_XX", lambda s: re.sub(r"^sm_\d+", "gfx90a", s, flags=re.M)),
    "escaping_path": (AM_ERR_FORMAT, "must be relative", lambda s: re.sub(r" (sm_\d+/masked)", r" ../\1", s, count=1)),
    "absolute_path": (AM_ERR_FORMAT, "must be relative", lambda s: re.sub(r" (sm_\d+/masked)", r" /\1", s, count=1)),
    "duplicate_line": (AM_ERR_FORMAT, "listed twice",
                       lambda s: s + next(x for x in s.splitlines() if x.startswith("sm_")) + "\n"),
    "missing_kernel": (AM_ERR_FORMAT, "lacks the kernel explain_weighted",
                       lambda s: "\n".join(x for x in s.splitlines() if " explain_weighted " not in x) + "\n"),
    "no_kernels": (AM_ERR_FORMAT, "lists none of this library's kernels",
                   lambda s: "# empty\n\n" + _export_line(*VARIANTS[DEFAULT]) + "\n"),
    "comments_only": (AM_ERR_FORMAT, "lacks the export line `export dtype=<float32|float16> C=<int> HW=<int>",
                      lambda s: "# empty\n\n"),
    "no_export_line": (AM_ERR_FORMAT, "must be the export line `export dtype=<float32|float16> C=<int> HW=<int> "
                       "M=<int> p=<float> eps=<float>`", lambda s: re.sub(r"^export .*\n", "", s, flags=re.M)),
    "export_line_last": (AM_ERR_FORMAT, "must be the export line",
                         lambda s: re.sub(r"^(export .*\n)((?:.*\n)*)", r"\2\1", s, flags=re.M)),
    "export_twice": (AM_ERR_FORMAT, "a second export line (the first is line ",
                     lambda s: s + _export_line(*VARIANTS[DEFAULT]) + "\n"),
    "export_dtype": (AM_ERR_FORMAT, "export dtype 'bfloat16' is not one this library launches (float32, float16)",
                     lambda s: s.replace("dtype=float32", "dtype=bfloat16", 1)),
    "export_key_order": (AM_ERR_FORMAT, "export line field 3 is 'HW=32', expected C=",
                         lambda s: s.replace("C=64 HW=32", "HW=32 C=64", 1)),
    "export_fields": (AM_ERR_FORMAT, "the export line has 6 fields, expected 7",
                      lambda s: s.replace(" eps=1e-06", "", 1)),
    "export_bad_int": (AM_ERR_FORMAT, "export M '0' is not an integer in [1, ",
                       lambda s: s.replace(" M=5 ", " M=0 ", 1)),
    "export_bad_p": (AM_ERR_FORMAT, "export p '3.0x' is not a finite number > 0",
                     lambda s: s.replace(" p=3.0 ", " p=3.0x ", 1)),
    "export_nan_p": (AM_ERR_FORMAT, "export p 'nan' is not a finite number",
                     lambda s: s.replace(" p=3.0 ", " p=nan ", 1)),
    "export_bad_eps": (AM_ERR_FORMAT, "export eps '-1e-06' is not a finite number >= 0",
                       lambda s: s.replace(" eps=1e-06", " eps=-1e-06", 1)),
    "missing_cubin": (AM_ERR_IO, "cannot open the cubin of", "rm"),
    "not_a_cubin": (AM_ERR_FORMAT, "is not a cubin", "garbage"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_export(client, export_dir, tmp_path, target, case):
    code, needle, edit = MALFORMED[case]
    bad = _copy_export(export_dir, tmp_path / "export")
    table = bad / "kernels" / "launch.txt"
    if case == "missing_launch_txt":
        table.unlink()
    elif edit == "rm":
        (bad / "kernels" / target / "explain.cubin").unlink()
    elif edit == "garbage":
        (bad / "kernels" / target / "explain.cubin").write_bytes(b"not an ELF file")
    else:
        _edit_table(bad, edit)
        assert table.read_text() != (export_dir / "kernels" / "launch.txt").read_text()
    rc, msg = client(bad, "open")["open"]
    assert rc == code and needle in msg, (rc, msg)


def test_unknown_kernels_and_comments_are_ignored(client, export_dir, tmp_path, target):
    ok = _copy_export(export_dir, tmp_path / "export")
    extra = f"{target} future_kernel sym {target}/x.cubin 1 0 1 a,b\n"
    _edit_table(ok, lambda s: "  # leading comment\n\n" + s + extra)
    rc, msg = client(ok, "open")["open"]
    assert rc == (AM_OK if GPU else AM_ERR_NO_DRIVER), msg  # got past the table


# ---------------------------------------------------------------------------------------------------------------------
# The driver path against the mock libcuda.so.1
# ---------------------------------------------------------------------------------------------------------------------


def _info(variant: str, target: str) -> list:
    p, dtype = VARIANTS[variant]
    return [4 if dtype == "float32" else 2, SHAPE["C"], SHAPE["HW"], SHAPE["M"], p, EPS, target]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mock_info(client, mock_driver, exports, tmp_path, target, variant):
    """am_get_info reports launch.txt's export line (p parsed exactly) and the target in use."""
    env = _mock_env(mock_driver, exports[variant], target, tmp_path / "mock.log", AM_MOCK_CC=target[3:])
    res = client(exports[variant], "open", env=env)
    assert res["open"] == [AM_OK, ""] and res["info"] == _info(variant, target), res


@pytest.mark.parametrize("variant", ["p3-fp32", "p2.9-fp16"])
def test_mock_launch_marshalling(client, mock_driver, exports, tmp_path, target, variant):
    export = _copy_export(exports[variant], tmp_path / "export")
    # A larger grid constant and > 48 KiB of shared memory exercise the grid product and the opt-in attribute.
    _edit_table(export, lambda s: re.sub(rf"^({target} masked_gem_pool \S+ \S+ \d+) \d+ \d+ ", r"\1 65536 4 ", s,
                                         flags=re.M))
    log = tmp_path / "mock.log"
    res = client(export, "launch", env=_mock_env(mock_driver, export, target, log, AM_MOCK_CC=target[3:]))
    lines = log.read_text().splitlines()
    assert res["target"] == target and res["info"] == _info(variant, target), res
    assert res["info_null_out"][0] == AM_ERR_ARG and "out is NULL" in res["info_null_out"][1], res
    assert res["pool"] == res["explain"] == res["explain_weighted"] == [0, ""], res
    assert [ln for ln in lines if ln.startswith("load ")] == ["load masked_gem_pool", "load explain",
                                                              "load explain_weighted"]
    assert "set_attribute masked_gem_pool 8 65536" in lines  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    hexs = [f"0x{p:x}" for p in res["pool_ptrs"]]
    launches = [ln for ln in lines if ln.startswith("launch ")]
    assert launches[0] == ("launch masked_gem_pool grid=12,1,1 block=128,1,1 shared=65536 stream=0x5000 extra=(nil) "
                           f"params={','.join(hexs)},0x0,0x0")
    q, g, ids, w, d, dk, sh, dh, sc, err = (f"0x{p:x}" for p in res["explain_ptrs"])
    tail = "4,7,4,0x0,0x0"  # K, N, stride_iq = K, then the two scratch pointers
    assert launches[1] == ("launch explain grid=12,1,1 block=128,1,1 shared=32 stream=0x5000 extra=(nil) "
                           f"params={q},{g},{ids},{d},{dk},{sh},{dh},{sc},{err},{tail}")
    assert launches[2] == ("launch explain_weighted grid=12,1,1 block=128,1,1 shared=32 stream=0x5000 extra=(nil) "
                           f"params={q},{g},{ids},{w},{d},{dk},{sh},{dh},{sc},{err},{tail}")
    assert len(launches) == 3  # the invalid calls below never reached the driver
    # err is zeroed on the launch's stream right before each explain launch
    for launch in launches[1:]:
        assert lines[lines.index(launch) - 1] == f"memset32 {err} 0 1 stream=0x5000"
    for name, needle in (("pool_batch0", "batch = 0"), ("pool_grid_overflow", "more than CUDA's 2^31-1"),
                         ("pool_misaligned", "not 16-byte aligned"), ("pool_null", "f_k is a NULL device pointer"),
                         ("explain_overflow", f"Q*K = {46341**2} gives"), ("explain_k0", "K = 0"),
                         ("explain_null_err", "err is a NULL device pointer")):
        rc, msg = res[name]
        assert rc == AM_ERR_ARG and needle in msg, (name, res[name])
    assert res["roundtrip"] == [1, 7, 7, 4]
    assert res["synchronize_ctx"][0] == res["synchronize_stream"][0] == 0
    assert "synchronize context" in lines and "synchronize stream=0x5000" in lines
    assert not [ln for ln in lines if ln.startswith("error")], lines  # every call had the context current
    assert lines[-1] == "final retained=0 pushed=0 modules=0 allocs=0"  # balanced push/pop, nothing leaked


def _replay_dir(case: Path, out: Path, dtype: str, f_k_factor: float = 1.0) -> Path:
    """What the kernels would write for `case`: its references, the pooling outputs in the export's dtype."""
    shutil.copytree(case, out)
    for name in ("f", "f_k"):
        ref = np.fromfile(case / f"{name}.bin", dtype="<f4") * (f_k_factor if name == "f_k" else 1.0)
        ref.astype("<f2" if dtype == "float16" else "<f4").tofile(out / f"{name}.bin")
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mock_program_replay(clib, mock_driver, exports, cases, tmp_path, target, variant):
    """The test program end to end on the mock driver replaying the expected outputs; then a perturbed reference."""
    export, case, dtype = exports[variant], cases[variant], VARIANTS[variant][1]
    env = {**os.environ, **_mock_env(mock_driver, export, target, tmp_path / "mock.log"), "AM_MOCK_CC": target[3:]}
    replay = _replay_dir(case, tmp_path / "replay", dtype)
    proc = _run([clib["prog"], export, case], env={**env, "AM_MOCK_REPLAY": str(replay)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PASSED: 0 check(s) failed" in out, out
    assert f"target {target}, export dtype {dtype} C 64 HW 32 M 5 p " in out, out
    assert "ok   bad id counted once, its d is NaN" in out and "ok   explain_weighted scores" in out, out
    assert "ok   float16 <-> float32 conversions" in out and "ok   pooling inputs are exact in the export dtype" in out
    tol = "2e-03" if dtype == "float16" else "1e-04"
    err = float(re.search(rf"ok   masked_gem_pool f_k: rel err (\S+) \(tol {tol}\)", out).group(1))
    assert (0 < err < 5e-4) if dtype == "float16" else err < 1e-7, out  # float16 rounding of the outputs, or none
    # A perturbed f_k is replayed but compared with the original: beyond the dtype's tolerance.
    factor = 1.01 if dtype == "float16" else 1.001
    perturbed = _replay_dir(case, tmp_path / "perturbed", dtype, f_k_factor=factor)
    proc = _run([clib["prog"], export, case], env={**env, "AM_MOCK_REPLAY": str(perturbed)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "FAILED: 1 check(s) failed" in out, out
    err = float(re.search(r"FAIL masked_gem_pool f_k: rel err (\S+)", out).group(1))
    assert err == pytest.approx(factor - 1.0, rel=0.1), out
    assert "ok   masked_gem_pool f:" in out, out


def test_mock_program_pooling_inputs_not_in_dtype(clib, mock_driver, exports, cases, tmp_path, target):
    """A float16 case whose inputs float16 cannot hold exactly is flagged (its references would not be the kernel's)."""
    variant = "p2.9-fp16"
    case = shutil.copytree(cases[variant], tmp_path / "case")
    np.full(SHAPE["C"], 1.0 + 2.0**-12, dtype="<f4").tofile(case / "scale.bin")  # between two float16 values
    env = {**os.environ, **_mock_env(mock_driver, exports[variant], target, tmp_path / "mock.log"),
           "AM_MOCK_CC": target[3:], "AM_MOCK_REPLAY": str(_replay_dir(case, tmp_path / "replay", "float16"))}
    proc = _run([clib["prog"], exports[variant], case], env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and f"FAIL pooling inputs are exact in the export dtype: {SHAPE['C']} value(s)" in out


def test_program_case_mismatch(clib, mock_driver, exports, cases, tmp_path, target):
    """The test program refuses a case of another dtype or shape than the export's (exit 2), naming each difference."""
    env = {**os.environ, **_mock_env(mock_driver, export_dir := exports[DEFAULT], target, tmp_path / "mock.log"),
           "AM_MOCK_CC": target[3:]}
    proc = _run([clib["prog"], export_dir, cases["p2.9-fp16"]], env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not match the export (am_get_info): dtype float16 (export float32); p 2.9 " \
           "(export 3);" in proc.stderr, proc.stderr
    other = shutil.copytree(cases[DEFAULT], tmp_path / "case")
    text = (other / "case.txt").read_text()
    (other / "case.txt").write_text(text.replace("\nC 64\n", "\nC 32\n").replace("\nM 5\n", "\nM 6\n"))
    proc = _run([clib["prog"], export_dir, other], env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "(am_get_info): C 32 (export 64); M 6 (export 5);" in proc.stderr, proc.stderr


def test_mock_no_target(client, mock_driver, export_dir, tmp_path, target):
    log = tmp_path / "mock.log"
    other = "90" if target.startswith("sm_8") else "86"  # another major: no fallback
    res = client(export_dir, "open", env=_mock_env(mock_driver, export_dir, target, log, AM_MOCK_CC=other))
    rc, msg = res["open"]
    assert rc == AM_ERR_NO_TARGET, msg
    assert f"compute capability {other[0]}.{other[1]} (sm_{other})" in msg and f"compiled for {target}" in msg
    assert f"--targets sm_{other}" in msg
    assert log.read_text().splitlines()[-1] == "final retained=0 pushed=0 modules=0 allocs=0"


def test_mock_no_device(clib, client, mock_driver, export_dir, case_dir, tmp_path, target):
    log = tmp_path / "mock.log"
    env = _mock_env(mock_driver, export_dir, target, log)
    rc, msg = client(export_dir, "open", "1", env=env)["open"]
    assert rc == AM_ERR_NO_DEVICE and "device 1 requested but 1 device(s)" in msg, msg
    proc = _run([clib["prog"], export_dir, case_dir], env={**os.environ, **env, "AM_MOCK_INIT": "100"})
    assert proc.returncode == 77, proc.stdout + proc.stderr
    assert proc.stdout.startswith("SKIP: AM_ERR_NO_DEVICE") and "CUDA_ERROR_NO_DEVICE" in proc.stdout


def _retarget(src: Path, dst: Path, src_target: str, targets: dict[str, int]) -> Path:
    """A copy of export `src` whose kernels are listed as `targets` (name -> the pooling's shared_bytes) instead of
    `src_target`. The cubins are copies: neither the library nor the mock reads the architecture from the ELF."""
    shutil.copytree(src, dst)
    table = dst / "kernels" / "launch.txt"
    lines = table.read_text().splitlines()
    head = [x for x in lines if not x.startswith(f"{src_target} ")]
    body = [x for x in lines if x.startswith(f"{src_target} ")]
    for name, shared in targets.items():
        if name != src_target:
            shutil.copytree(dst / "kernels" / src_target, dst / "kernels" / name)
        for line in body:
            cols = line.replace(f"{src_target}/", f"{name}/").split()
            cols[0] = name
            if cols[1] == "masked_gem_pool":
                cols[5] = str(shared)
            head.append(" ".join(cols))
    if src_target not in targets:
        shutil.rmtree(dst / "kernels" / src_target)
    table.write_text("\n".join(head) + "\n")
    return dst


# device compute capability, its opt-in shared memory (None: the mock's 232448), the export's targets with their
# pooling kernel's shared memory, and the target am_open must choose (or the NO_TARGET message's distinctive part).
FALLBACK = {
    "sm86_runs_sm80": ("86", None, {"sm_80": 65536, "sm_87": 70000}, "sm_80"),
    "sm89_runs_highest_lower": ("89", None, {"sm_80": 65536, "sm_87": 70000}, "sm_87"),
    "sm89_skips_too_big": ("89", 68000, {"sm_80": 65536, "sm_87": 70000}, "sm_80"),
    "exact_first": ("87", None, {"sm_80": 65536, "sm_87": 70000}, "sm_87"),
    "exact_sm80": ("80", None, {"sm_80": 65536, "sm_87": 70000}, "sm_80"),
    "sm86_sm80_too_big": ("86", 60000, {"sm_80": 65536},
                          "(sm_80 would run on it, but its masked_gem_pool kernel needs 65536 bytes of shared memory "
                          "per block and the device allows 60000)"),
    "sm86_only_sm90": ("86", None, {"sm_90": 65536}, "compiled for sm_90;"),
    "sm86_only_sm87": ("86", None, {"sm_87": 65536}, "compiled for sm_87;"),  # a later minor does not run
    "sm75_sm80": ("75", None, {"sm_80": 65536}, "compiled for sm_80;"),
    "sm91_sm90_arch_specific": ("91", None, {"sm_90": 65536},
                                "(sm_90 cubins are compiled for the arch-specific sm_90a, which runs on compute "
                                "capability 9.0 only)"),
}


@pytest.mark.parametrize("case", list(FALLBACK))
def test_mock_target_fallback(client, mock_driver, export_dir, tmp_path, target, case):
    cc, optin, targets, want = FALLBACK[case]
    export = _retarget(export_dir, tmp_path / "export", target, targets)
    log = tmp_path / "mock.log"
    env = _mock_env(mock_driver, export_dir, target, log, AM_MOCK_CC=cc,
                    **({"AM_MOCK_OPTIN": str(optin)} if optin else {}))
    res = client(export, "open", env=env)
    lines = log.read_text().splitlines()
    rc, msg = res["open"]
    if want.startswith("sm_"):
        assert rc == AM_OK and res["target"] == want and res["info"][-1] == want, res
        # the chosen target's cubins were loaded: its pooling kernel opted into its own shared memory size
        assert f"set_attribute masked_gem_pool 8 {targets[want]}" in lines, lines
    else:
        assert rc == AM_ERR_NO_TARGET and want in msg, msg
        assert f"compute capability {cc[0]}.{cc[1]} (sm_{cc})" in msg and f"--targets sm_{cc}" in msg, msg
        assert not [ln for ln in lines if ln.startswith("load ")], lines
    assert lines[-1] == "final retained=0 pushed=0 modules=0 allocs=0"
