"""TensorRT engine build (export/tensorrt_engine.py) and the TensorRT logger it shares with the runtime
(attrimeter/artefact/device.py).

TensorRT cannot be installed on the CPU machines, so every TensorRT name the modules use is checked here against the
``tensorrt-stubs`` type stubs (text-scanned: their tensorrt.pyi has a syntax error that stops ``ast`` and mypy). The
builds themselves run where TensorRT and a CUDA GPU are.
"""

import ast
import json
import re
import struct
import textwrap
from pathlib import Path

import pytest
from api_names import NOT_IN_STUBS, Stubs, load_stubs, name_problems, tensorrt_chains

from attrimeter.artefact import device
from attrimeter.export import plugin_kernel as pk
from attrimeter.export import tensorrt_engine as te

MODULE = Path(te.__file__)
# Every module whose TensorRT calls are checked: the engine build, and the logger the export and the runtime share.
MODULES = (MODULE, Path(device.__file__))

# Variables of export/tensorrt_engine.py whose TensorRT class is known: every attribute read on them is checked.
TYPED_NAMES = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "parser_error": "ParserError",
    "config": "IBuilderConfig",
    "profile": "IOptimizationProfile",
    "timing": "ITimingCache",
    "serialized": "IHostMemory",
    "tensor": "ITensor",
}
# Members reached another way (a call result, a subclass override): (class, member).
EXPLICIT_MEMBERS = [
    ("IBuilderConfig", "get_timing_cache"),
    ("ITimingCache", "serialize"),
    ("IBuilderConfig", "progress_monitor"),
    ("ILogger", "log"),
    ("IProgressMonitor", "phase_start"),
    ("IProgressMonitor", "step_complete"),
    ("IProgressMonitor", "phase_finish"),
    # EngineRunner (the export's check of the built engine).
    ("Runtime", "deserialize_cuda_engine"),
    ("ICudaEngine", "create_execution_context"),
    ("ICudaEngine", "num_io_tensors"),
    ("ICudaEngine", "get_tensor_name"),
    ("ICudaEngine", "get_tensor_mode"),
    ("ICudaEngine", "get_tensor_dtype"),
    ("IExecutionContext", "set_input_shape"),
    ("IExecutionContext", "set_tensor_address"),
    ("IExecutionContext", "get_tensor_shape"),
    ("IExecutionContext", "execute_async_v3"),
    ("TensorIOMode", "OUTPUT"),
]
# Removed in TensorRT 11 (strong typing only; explicit batch always):
# https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
REMOVED_IN_11 = {"FP16", "BF16", "INT8", "FP8", "EXPLICIT_BATCH", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS", "platform_has_fast_fp16", "platform_has_fast_int8"}
PLUGIN_ATTRIBUTES = ["channels", "eps", "num_attributes", "p", "p_int"]


@pytest.fixture(scope="module")
def stubs() -> Stubs:
    return load_stubs()


def _problems(stubs: Stubs, source: str) -> list[str]:
    return name_problems(stubs, source, TYPED_NAMES)


# --------------------------------------------------------------------------------------------------- static checks


def test_every_tensorrt_name_exists_in_the_stubs(stubs):
    sources = {path.name: path.read_text() for path in MODULES}
    chains = set()
    for name, source in sources.items():
        chains |= {".".join([root, *chain]) for root, chain, _ in tensorrt_chains(ast.parse(source))}
        assert _problems(stubs, source) == [], f"{name}: names missing from tensorrt-stubs {stubs.version}"
    # The collector must see the API the modules are built on, or the check above proves nothing.
    assert {"tensorrt.Builder", "tensorrt.OnnxParser", "tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED",
            "tensorrt.MemoryPoolType.WORKSPACE", "tensorrt.plugin.aot_impl", "tensorrt.ILogger",
            "tensorrt.ILogger.Severity.ERROR", "tensorrt.ILogger.Severity.WARNING"} <= chains, sorted(chains)
    for cls, member in EXPLICIT_MEMBERS:
        assert member in stubs.members(cls), f"{cls}.{member} not in tensorrt-stubs {stubs.version}"
        assert any(re.search(rf"\b{member}\b", source) for source in sources.values()), \
            f"{member} no longer used: drop it from EXPLICIT_MEMBERS"
    used = {node.id for node in ast.walk(ast.parse(sources[MODULE.name])) if isinstance(node, ast.Name)}
    assert set(TYPED_NAMES) <= used, f"TYPED_NAMES not used by the module: {set(TYPED_NAMES) - used}"


def test_a_misspelt_name_is_caught(stubs):
    source = textwrap.dedent("""
        import tensorrt as trt
        import tensorrt.plugin as trtp
        builder = trt.Bulder(None)
        flag = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPD
        config = builder.create_builder_config()
        config.set_timing_cach(None, False)
        trtp.aot_iml("x::y")
    """)
    assert sorted(p.split(": ", 1)[1] for p in _problems(stubs, source)) == [
        "IBuilderConfig.set_timing_cach (config.set_timing_cach)", "tensorrt.Bulder",
        "tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPD", "tensorrt.plugin.aot_iml"]


def test_stubs_version_and_plugin_coverage(stubs):
    # The allow-list above is only consulted for tensorrt.plugin while the stubs do not cover it (10.13 does not).
    assert re.match(r"1[01]\.", stubs.version), stubs.version
    if stubs.plugin_module is not None:
        assert not any(name.startswith("tensorrt.plugin.") for name in NOT_IN_STUBS), \
            "tensorrt-stubs now covers tensorrt.plugin: drop those NOT_IN_STUBS entries"


def test_no_api_removed_in_tensorrt_11():
    chains = [chain for path in MODULES for _, chain, _ in tensorrt_chains(ast.parse(path.read_text()))]
    assert not [c for c in chains if REMOVED_IN_11 & set(c)]


def test_plugin_functions_follow_the_qdp_schema():
    tree = ast.parse(MODULE.read_text())
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body), \
        "tensorrt.plugin needs live annotations (issubclass(annotation, TensorDesc)), not strings"
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute):
                    found[deco.func.attr] = node
    register, aot = found["register"], found["aot_impl"]
    tensors = ["f", "z", "scale", "shift"]
    assert [a.arg for a in register.args.args] == tensors + PLUGIN_ATTRIBUTES
    # aot_impl: (inputs, attributes in register order, outputs, tactic) with a return annotation.
    assert [a.arg for a in aot.args.args] == tensors + PLUGIN_ATTRIBUTES + ["outputs", "tactic"]
    assert register.returns is not None and aot.returns is not None
    assert all(a.annotation is not None for a in register.args.args)


# --------------------------------------------------------------------------------------------------- kernel metadata

_ENTRY_PARAMS = 8


def _ptx(symbol: str = "_masked_gem_pool_fwd_kernel", target: str = "sm_90a", read_hidden: bool = False) -> str:
    params = ",\n".join(f"\t.param .u64 .ptr .global .align 1 {symbol}_param_{i}" for i in range(_ENTRY_PARAMS))
    loads = "\n".join(f"\tld.param.b64 \t%rd{i}, [{symbol}_param_{i}];" for i in range(7 if read_hidden else 6))
    return (f"//\n.version 8.7\n.target {target}\n.address_size 64\n\n.visible .entry {symbol}(\n{params}\n)\n"
            f".reqntid 128\n{{\n\t.reg .b64 \t%rd<9>;\n{loads}\n\tret;\n}}\n")


def _cubin_header(cc: int) -> bytes:
    """The 64-byte ELF header of a cubin for sm_{cc} (all that artefact.kernels.load_kernel reads of a cubin)."""
    abi = 8 if cc >= 90 else 7  # the CUDA ELF ABI version moves the SM from e_flags' low byte to the next one
    flags = cc << 8 if abi >= 8 else cc
    ident = b"\x7fELF" + bytes([2, 1, 1, 0x33, abi]) + bytes(7)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, 190, 1, 0, 0, 0, flags, 64, 0, 0, 0, 0, 0)


def _write_kernel(root: Path, cc: int, *, target: str | None = None, shared: int = 122880, read_hidden: bool = False,
                  params: list[dict] | None = None, constants: dict | None = None) -> Path:
    folder = root / "kernels" / f"sm_{cc}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "masked_gem_pool.cubin").write_bytes(_cubin_header(cc))
    (folder / "masked_gem_pool.ptx").write_text(_ptx(target=target or f"sm_{cc}a", read_hidden=read_hidden))
    names = ["f_ptr", "z_ptr", "scale_ptr", "shift_ptr", "out_g_ptr", "out_k_ptr"]
    meta = {"kernel": "masked_gem_pool", "symbol": "_masked_gem_pool_fwd_kernel", "target": f"sm_{cc}", "cc": cc,
            "cubin": "masked_gem_pool.cubin", "ptx": "masked_gem_pool.ptx", "num_warps": 4, "num_stages": 3,
            "threads": 128, "shared_bytes": shared,
            "params": params or [{"name": n, "type": "*fp32"} for n in names] + [
                {"name": "global_scratch", "type": "scratch", "size": 0, "align": 1},
                {"name": "profile_scratch", "type": "scratch", "size": 0, "align": 1}],
            "grid": {"x": ["B", 4], "y": [1], "z": [1]},
            "constants": constants or {"C": 512, "HW": 128, "M": 26, "p": 3.0, "eps": 1e-06, "BLOCK_C": 128},
            "triton_version": "3.9.0", "ptx_version": "8.7"}
    path = folder / "masked_gem_pool.json"
    path.write_text(json.dumps(meta))
    return path


def test_kernel_drops_triton_hidden_parameters(tmp_path):
    kernel = pk.load_plugin_kernel(_write_kernel(tmp_path, 90))
    entry = re.search(r"\.entry\s+_masked_gem_pool_fwd_kernel\s*\(([^)]*)\)", kernel.ptx)
    assert entry is not None
    declared = [p.split()[-1] for p in entry.group(1).split(",")]
    assert declared == [f"_masked_gem_pool_fwd_kernel_param_{i}" for i in range(6)]  # what TensorRT passes
    assert (kernel.ptx_target, kernel.ptx_version, kernel.dtype) == ("sm_90a", "8.7", "fp32")
    assert (kernel.grid_x, kernel.grid_y, kernel.grid_z, kernel.num_warps) == (("B", 4), 1, 1, 4)
    assert "ld.param.b64 \t%rd5, [_masked_gem_pool_fwd_kernel_param_5];" in kernel.ptx


def test_kernel_that_reads_its_scratch_pointer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reads its hidden parameter"):
        pk.load_plugin_kernel(_write_kernel(tmp_path, 90, read_hidden=True))


@pytest.mark.parametrize("bad", [
    {"name": "n", "type": "i32"},
    {"name": "global_scratch", "type": "scratch", "size": 256, "align": 1},
])
def test_kernel_params_trt_cannot_pass_are_refused(tmp_path, bad):
    params = [{"name": n, "type": "*fp32"} for n in ("f", "z", "s", "t", "g", "k")] + [bad]
    with pytest.raises(ValueError):
        pk.load_plugin_kernel(_write_kernel(tmp_path, 90, params=params))


def test_spec_that_disagrees_with_the_kernel_is_refused_before_tensorrt(tmp_path):
    spec = te.PluginSpec(kernel_json=_write_kernel(tmp_path, 90), num_attributes=26, channels=256, height=16, width=8)
    with pytest.raises(ValueError, match="'C': \\(512, 256\\)"):
        te.register_masked_gem_pool_plugin(spec)


def test_kernel_json_for_device(tmp_path):
    exact = _write_kernel(tmp_path, 90)
    assert pk.kernel_json_for_device(tmp_path, 90) == exact
    # sm_80 PTX (plain .target) is forward compatible: an sm_86 GPU may JIT it, if the shared memory fits.
    ampere = _write_kernel(tmp_path, 80, target="sm_80", shared=65536)
    assert pk.kernel_json_for_device(tmp_path, 86) == ampere
    with pytest.raises(ValueError, match="shared memory"):
        pk.kernel_json_for_device(tmp_path, 86, max_shared_bytes=49152)
    # Triton's sm_100a PTX is arch-specific: never for sm_103.
    _write_kernel(tmp_path, 100)
    with pytest.raises(ValueError, match=r"arch-specific.*--targets sm_103"):
        pk.kernel_json_for_device(tmp_path, 103)
    with pytest.raises(ValueError, match=r"available: sm_80, sm_90, sm_100.*--targets sm_75"):
        pk.kernel_json_for_device(tmp_path, 75)


# --------------------------------------------------------------------------------------------------- availability


def test_tensorrt_available_names_what_is_missing():
    message = te.tensorrt_available()
    if message is None:
        pytest.skip("TensorRT and a CUDA GPU are present here")
    assert "TensorRT" in message and message.endswith(".")
    try:
        import tensorrt
    except ModuleNotFoundError:
        assert "not installed" in message
    except (ImportError, OSError):
        assert "cannot be loaded" in message
    else:
        if not hasattr(tensorrt, "Builder"):  # only tensorrt-stubs' bare .pyi folder
            assert "type stubs" in message


# --------------------------------------------------------------------------------------------------- GPU machine


@pytest.fixture
def trt():
    module = pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU machine: pip install "
                                 "'attrimeter[trt]')")
    missing = te.tensorrt_available()  # also catches tensorrt-stubs' importable-but-empty `tensorrt`
    if missing is not None:
        pytest.skip(missing)
    return module


def _conv_relu_onnx(path: Path, size: tuple[int, int]) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, *size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4, *size])],
        [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_build_engine_portable(trt, tmp_path):
    onnx_path = _conv_relu_onnx(tmp_path / "tiny.onnx", (16, 8))
    cache = tmp_path / "timing.cache"
    info = te.build_engine(onnx_path, tmp_path / "tiny.engine", max_batch=4, opt_batch=2, image_size=(16, 8),
                           plugin=None, timing_cache=cache, workspace_gib=0.25, progress=False)
    assert (tmp_path / "tiny.engine").stat().st_size == info["engine_bytes"] > 0
    assert cache.stat().st_size > 0
    assert info["tensorrt_version"] == trt.__version__ and info["device_name"]
    assert info["compute_capability"] >= 70 and info["build_seconds"] > 0
    assert info["profile"] == {"input": "images", "min": [1, 3, 16, 8], "opt": [2, 3, 16, 8], "max": [4, 3, 16, 8]}
    assert info["plugin_kernel_target"] is None
    again = te.build_engine(onnx_path, tmp_path / "again.engine", max_batch=4, opt_batch=2, image_size=(16, 8),
                            plugin=None, timing_cache=cache, progress=True)  # reuses the cache, shows progress
    assert again["engine_bytes"] > 0


def test_build_engine_reports_parser_errors(trt, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["images"], ["out"], name="mystery", domain="nowhere")], "bad",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("nowhere", 1)]), path)
    with pytest.raises(ValueError, match="mystery"):
        te.build_engine(path, tmp_path / "bad.engine", max_batch=2, opt_batch=1, image_size=(8, 8), plugin=None,
                        timing_cache=None, progress=False)


def _toy_plugin(tmp_path: Path, c: int, m: int, h: int, w: int) -> te.PluginSpec:
    """A Triton kernel with the MaskedGemPool ABI (4 inputs, 2 outputs, no scalars), compiled for this GPU.

    It computes f[b, c] = sum_hw F * scale + shift and f_k[b, m, c] = sum_hw Z[b, m] * F[b, c]: enough to see that
    TensorRT passes the pointers in the documented order and launches the grid/block from the JSON.
    """
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def toy(f_ptr, z_ptr, scale_ptr, shift_ptr, out_g_ptr, out_k_ptr,
            C: tl.constexpr, HW: tl.constexpr, M: tl.constexpr):
        b = tl.program_id(0)
        cs, hws, ms = tl.arange(0, C), tl.arange(0, HW), tl.arange(0, M)
        f = tl.load(f_ptr + b * C * HW + cs[:, None] * HW + hws[None, :])
        z = tl.load(z_ptr + b * M * HW + ms[:, None] * HW + hws[None, :])
        g = tl.sum(f, axis=1) * tl.load(scale_ptr + cs) + tl.load(shift_ptr + cs)
        tl.store(out_g_ptr + b * C + cs, g)
        k = tl.sum(z[:, None, :] * f[None, :, :], axis=2)
        tl.store(out_k_ptr + b * M * C + ms[:, None] * C + cs[None, :], k)

    names = ["f_ptr", "z_ptr", "scale_ptr", "shift_ptr", "out_g_ptr", "out_k_ptr"]
    constants = {"C": c, "HW": h * w, "M": m}
    signature = {n: "*fp32" for n in names} | {k: "constexpr" for k in constants}
    target = triton.runtime.driver.active.get_current_target()
    compiled = triton.compile(triton.compiler.ASTSource(fn=toy, signature=signature, constexprs=constants),
                              target=target)
    ptx = compiled.asm["ptx"]
    entry = re.search(rf"\.entry\s+{compiled.metadata.name}\s*\(([^)]*)\)", ptx)
    assert entry is not None
    hidden = len([p for p in entry.group(1).split(",") if p.strip()]) - len(names)
    folder = tmp_path / "kernels" / f"sm_{target.arch}"
    folder.mkdir(parents=True)
    (folder / "toy.ptx").write_text(ptx)
    (folder / "toy.cubin").write_bytes(compiled.asm["cubin"])
    meta = {"kernel": "masked_gem_pool", "symbol": compiled.metadata.name, "target": f"sm_{target.arch}",
            "cc": target.arch, "ptx": "toy.ptx", "cubin": "toy.cubin", "num_warps": compiled.metadata.num_warps,
            "threads": 32 * compiled.metadata.num_warps, "shared_bytes": compiled.metadata.shared,
            "params": [{"name": n, "type": "*fp32", "role": "input" if i < 4 else "output"}
                       for i, n in enumerate(names)]
            + [{"name": f"scratch{i}", "type": "scratch", "size": 0, "align": 1} for i in range(hidden)],
            "grid": {"x": ["B", 1], "y": [1], "z": [1]}, "constants": constants}
    (folder / "masked_gem_pool.json").write_text(json.dumps(meta))
    return te.PluginSpec(kernel_json=pk.kernel_json_for_device(tmp_path, target.arch), num_attributes=m, channels=c,
                         height=h, width=w)


def test_plugin_engine_runs_the_aot_kernel(trt, tmp_path):
    torch = pytest.importorskip("torch")
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, m, h, w = 8, 4, 4, 4
    spec = _toy_plugin(tmp_path, c, m, h, w)
    te.register_masked_gem_pool_plugin(spec)
    te.register_masked_gem_pool_plugin(spec)  # idempotent
    rng = np.random.default_rng(1)
    arrays = {"wf": rng.normal(size=(c, 3, 1, 1)), "wz": rng.normal(size=(m, 3, 1, 1)),
              "scale": rng.normal(size=c), "shift": rng.normal(size=c)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    node = helper.make_node("MaskedGemPool", ["F", "Z", "scale", "shift"], ["f", "f_k"], name="pool",
                            domain="attrimeter", channels=c, eps=1e-6, num_attributes=m, p=3.0, p_int=3,
                            plugin_namespace="attrimeter", aot=1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "wf"], ["F"]), helper.make_node("Conv", ["images", "wz"], ["Z"]), node],
        "toy", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, h, w])],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["B", c]),
         helper.make_tensor_value_info("f_k", TensorProto.FLOAT, ["B", m, c])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    onnx_path = tmp_path / "toy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("attrimeter", 1)]), onnx_path)
    info = te.build_engine(onnx_path, tmp_path / "toy.engine", max_batch=4, opt_batch=2, image_size=(h, w),
                           plugin=spec, timing_cache=None, progress=False)
    assert info["plugin_kernel_target"] == json.loads(spec.kernel_json.read_text())["target"]

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((tmp_path / "toy.engine").read_bytes())
    context = engine.create_execution_context()
    images = torch.randn(3, 3, h, w, device="cuda")
    outs = {"f": torch.empty(3, c, device="cuda"), "f_k": torch.empty(3, m, c, device="cuda")}
    context.set_input_shape("images", tuple(images.shape))
    context.set_tensor_address("images", images.data_ptr())
    for name, out in outs.items():
        context.set_tensor_address(name, out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()

    t = {k: torch.from_numpy(v).cuda() for k, v in arrays.items()}
    feat = torch.nn.functional.conv2d(images, t["wf"]).flatten(2)
    attn = torch.nn.functional.conv2d(images, t["wz"]).flatten(2)
    torch.testing.assert_close(outs["f"], feat.sum(2) * t["scale"] + t["shift"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["f_k"], torch.einsum("bmx,bcx->bmc", attn, feat), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flavor", ["portable", "plugin"])
def test_export_tensorrt_end_to_end(trt, tiny_interpreter, tmp_path, flavor):
    from attrimeter.artefact.manifest import load_manifest
    from attrimeter.export.build import ENGINE_FP32_TOLERANCE, export

    out = tmp_path / flavor
    manifest = export(tiny_interpreter, out, output_format="tensorrt", flavor=flavor, targets=(), max_batch=16,
                      opt_batch=4, progress=False)
    assert load_manifest(out) == manifest and manifest.files["model.engine"]
    engine = manifest.tensorrt
    assert engine is not None and engine.engine == "model.engine" and engine.timing_cache == "timing.cache"
    assert (out / "timing.cache").is_file()
    assert [r.batch for r in engine.verification.parity] == [1, 7]
    assert engine.verification.worst_error <= ENGINE_FP32_TOLERANCE
    if flavor == "plugin":
        assert engine.plugin is not None and engine.plugin.kernel_json.startswith("kernels/sm_")
        assert manifest.kernels is not None and manifest.kernels.pool_max_shared == 48 * 1024


def test_ptx_isa_and_driver_versions():
    # PTX ISA -> oldest CUDA driver that JIT-compiles it, and back (the check before a plugin engine is built).
    assert [pk.ptx_driver(isa) for isa in ("8.0", "8.4", "8.5", "8.6", "8.8", "9.0", "9.4")] == \
        [12000, 12040, 12050, 12070, 12090, 13000, 13040]
    assert [pk.driver_ptx(d) for d in (12000, 12040, 12060, 12080, 12090, 13000, 13020)] == \
        ["8.0", "8.4", "8.5", "8.7", "8.8", "9.0", "9.2"]
    assert pk.driver_ptx(11080) is None


def test_plugin_ptx_version_follows_the_driver():
    assert pk.plugin_ptx_version(None, 12040) == "8.4"
    assert pk.plugin_ptx_version(None, 13040) == "9.0"  # capped: enough for every target, assembled by Triton's ptxas
    assert pk.plugin_ptx_version("8.2", 12040) == "8.2"
    with pytest.raises(ValueError, match="newer than this driver"):
        pk.plugin_ptx_version("8.8", 12040)
    with pytest.raises(ValueError, match="older than CUDA 12.0"):
        pk.plugin_ptx_version(None, 11080)


def test_plugin_kernel_roles_must_be_inputs_then_outputs(tmp_path):
    names = ["f_ptr", "z_ptr", "scale_ptr", "shift_ptr", "out_g_ptr", "out_k_ptr"]
    roles = ["input", "input", "input", "output", "input", "output"]
    params = [{"name": n, "type": "*fp32", "role": r} for n, r in zip(names, roles, strict=True)] + [
        {"name": "global_scratch", "type": "scratch", "size": 0, "align": 1},
        {"name": "profile_scratch", "type": "scratch", "size": 0, "align": 1}]
    with pytest.raises(ValueError, match="4 inputs then 2 outputs"):
        pk.load_plugin_kernel(_write_kernel(tmp_path, 90, params=params))
