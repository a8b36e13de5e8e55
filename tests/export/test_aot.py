"""AOT kernels: cross-compiled without a GPU for every named target, with well-formed launch metadata."""

import json
import shutil

import pytest

from attrimeter.artefact.kernels import KernelError, KernelIndex, load_kernel
from attrimeter.artefact.manifest import load_manifest
from attrimeter.export import aot

# The demo model's shape (C, h·w, M) and a learned, non-integer p, as exported in fp32.
SHAPE = dict(channels=64, hw=32, num_attributes=5, p=2.9, eps=1e-6)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernels"
    index = aot.compile_kernels(out, aot.kernel_specs(**SHAPE, dtype="float32"), aot.DEFAULT_TARGETS)
    return out, index


def test_every_target_has_every_kernel(kernels):
    out, index = kernels
    assert set(index.targets) == set(aot.DEFAULT_TARGETS)
    assert KernelIndex.from_json(json.loads((out / "index.json").read_text()), "index.json") == index
    for target in aot.DEFAULT_TARGETS:
        for kernel in aot.KERNELS:
            meta = load_kernel(out / target / f"{kernel}.json")  # cubin ELF arch, PTX entry, params checked
            assert meta.target == target and meta.cc == int(target[3:])
            assert meta.shared_bytes <= aot.TARGETS[target]
            assert meta.threads == 32 * meta.num_warps
            assert [p.name for p in meta.params[-2:]] == ["global_scratch", "profile_scratch"]
            assert all(p.size == 0 for p in meta.params[-2:])
            ptx = meta.ptx_path.read_text()
            # Every parameter in the metadata is a parameter of the PTX entry, in the same number.
            entry = ptx.split(f".entry {meta.symbol}(", 1)[1].split(")", 1)[0]
            assert entry.count(".param") == len(meta.params)
            assert f".target sm_{meta.cc}" in ptx and meta.ptx_target.startswith(f"sm_{meta.cc}")
            assert index.targets[target][kernel].symbol == meta.symbol


def test_launch_contracts(kernels):
    out, _ = kernels
    pool = load_kernel(out / "sm_90" / "masked_gem_pool.json")
    assert [p.name for p in pool.params] == [
        "f_ptr", "z_ptr", "scale_ptr", "shift_ptr", "out_g_ptr", "out_k_ptr", "global_scratch", "profile_scratch"]
    assert [p.role for p in pool.params[:6]] == ["input"] * 4 + ["output"] * 2
    block_c = pool.constants["BLOCK_C"]
    assert pool.grid_x == ("B", -(-SHAPE["channels"] // block_c))
    assert pool.constants["P_INT"] == 0 and pool.constants["p"] == SHAPE["p"]
    explain = load_kernel(out / "sm_90" / "explain.json")
    names = [p.name for p in explain.params]
    assert "w_ptr" not in names and names[-5:-2] == ["K", "N", "stride_iq"]
    assert explain.grid_x == ("Q", "K")
    weighted = load_kernel(out / "sm_90" / "explain_weighted.json")
    assert [p.name for p in weighted.params][3] == "w_ptr"
    table = [line.split() for line in (out / "launch.txt").read_text().splitlines()
             if not line.startswith(("#", "export "))]
    assert len(table) == len(aot.DEFAULT_TARGETS) * len(aot.KERNELS)
    row = next(r for r in table if r[:2] == ["sm_90", "masked_gem_pool"])
    assert row[2:7] == [pool.symbol, "sm_90/masked_gem_pool.cubin", str(pool.threads), str(pool.shared_bytes),
                        str(pool.grid_x[1])]
    assert row[7].split(",") == [p.name for p in pool.params]


def test_tile_falls_back_to_fit_shared_memory(tmp_path):
    # fp32 pooling with C = 512, h·w = 128: the largest tile needs 120 KiB, more than sm_89's 99 KiB per block.
    specs = aot.kernel_specs(512, 128, 26, 3.0, 1e-6, "float32")[:1]
    aot.compile_kernels(tmp_path, specs, ("sm_89", "sm_90"))
    sm89 = load_kernel(tmp_path / "sm_89" / "masked_gem_pool.json")
    sm90 = load_kernel(tmp_path / "sm_90" / "masked_gem_pool.json")
    assert sm90.shared_bytes > aot.TARGETS["sm_89"] >= sm89.shared_bytes
    assert sm89.constants["BLOCK_C"] * sm89.constants["BLOCK_HW"] < \
        sm90.constants["BLOCK_C"] * sm90.constants["BLOCK_HW"]
    # A launcher without the > 48 KiB opt-in (TensorRT's AOT plugins) gets a tile that fits 48 KiB.
    capped = aot.kernel_specs(512, 128, 26, 3.0, 1e-6, "float32", pool_max_shared=48 * 1024)[:1]
    aot.compile_kernels(tmp_path / "capped", capped, ("sm_90",))
    assert load_kernel(tmp_path / "capped" / "sm_90" / "masked_gem_pool.json").shared_bytes <= 48 * 1024


def test_fp16_kernels_take_half_pointers(tmp_path):
    specs = aot.kernel_specs(**SHAPE, dtype="float16")[:1]
    aot.compile_kernels(tmp_path, specs, ("sm_87",))
    meta = load_kernel(tmp_path / "sm_87" / "masked_gem_pool.json")
    assert {p.type for p in meta.params[:6]} == {"*fp16"}
    assert meta.constants["DOT_PRECISION"] == "tf32"


def test_broken_artefacts_are_refused(kernels, tmp_path):
    out, _ = kernels
    folder = tmp_path / "k"
    shutil.copytree(out, folder)
    shutil.copy(folder / "sm_89" / "explain.cubin", folder / "sm_90" / "explain.cubin")
    with pytest.raises(KernelError, match="compiled for sm_89"):
        load_kernel(folder / "sm_90" / "explain.json")
    (folder / "sm_90" / "explain.cubin").write_bytes(b"not a cubin" * 10)
    with pytest.raises(KernelError, match="not a cubin"):
        load_kernel(folder / "sm_90" / "explain.json")
    shutil.copy(out / "sm_90" / "explain.cubin", folder / "sm_90" / "explain.cubin")
    (folder / "sm_90" / "explain.ptx").write_text("// empty")
    with pytest.raises(KernelError, match="has no entry _explain_kernel"):
        load_kernel(folder / "sm_90" / "explain.json")
    (folder / "sm_80" / "explain.cubin").unlink()
    with pytest.raises(KernelError, match="missing"):
        load_kernel(folder / "sm_80" / "explain.json")
    with pytest.raises(KernelError, match="unreadable"):
        load_kernel(folder / "sm_80" / "nothing.json")
    meta = json.loads((folder / "sm_86" / "explain.json").read_text())
    meta["threads"] = "128"  # a hand-edited file: the field is named, not a KeyError or a wrong launch
    (folder / "sm_86" / "bad.json").write_text(json.dumps(meta))
    with pytest.raises(KernelError, match="field 'threads' must be an integer >= 1, got '128'"):
        load_kernel(folder / "sm_86" / "bad.json")


def test_launch_table_says_what_the_export_was_built_for(kernels):
    out, _ = kernels
    line = next(line for line in (out / "launch.txt").read_text().splitlines() if not line.startswith("#"))
    assert line == (f"export dtype=float32 C={SHAPE['channels']} HW={SHAPE['hw']} M={SHAPE['num_attributes']} "
                    f"p={SHAPE['p']!r} eps={SHAPE['eps']!r}")


def test_ptx_version_can_be_pinned_for_older_drivers(tmp_path):
    specs = aot.kernel_specs(**SHAPE, dtype="float32", ptx_version="8.4")[1:2]
    aot.compile_kernels(tmp_path, specs, ("sm_90",))
    assert "\n.version 8.4\n" in (tmp_path / "sm_90" / "explain.ptx").read_text()
    with pytest.raises(ValueError, match="ptx_version"):
        aot.kernel_specs(**SHAPE, dtype="float32", ptx_version="84")


def test_metadata_that_disagrees_with_the_ptx_is_refused(kernels, tmp_path):
    out, _ = kernels
    folder = tmp_path / "k"
    shutil.copytree(out / "sm_90", folder)
    meta = json.loads((folder / "explain.json").read_text())
    meta["params"] = meta["params"][:-1]  # e.g. a Triton whose kernels take one hidden pointer fewer
    (folder / "explain.json").write_text(json.dumps(meta))
    with pytest.raises(KernelError, match="lists 13 parameters, the PTX entry declares 14"):
        load_kernel(folder / "explain.json")


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown GPU targets"):
        aot.compile_kernels("/nonexistent", [], ("sm_70",))
    with pytest.raises(ValueError, match="dtype"):
        aot.kernel_specs(**SHAPE, dtype="bfloat16")


def test_export_folder_carries_the_kernels(tiny_interpreter, tmp_path):
    from attrimeter.export.build import export

    manifest = export(tiny_interpreter, tmp_path / "exp", targets=("sm_90",), progress=False)
    assert manifest.kernels is not None and manifest.kernels.targets == ("sm_90",)
    assert manifest.kernels.index == "kernels/index.json" and manifest.kernels.triton_version
    files = load_manifest(tmp_path / "exp").files
    assert {"kernels/index.json", "kernels/launch.txt", "kernels/sm_90/masked_gem_pool.cubin",
            "kernels/sm_90/explain.ptx"} <= set(files)
    pool = load_kernel(tmp_path / "exp" / "kernels" / "sm_90" / "masked_gem_pool.json")
    C, h, w = manifest.feature_map
    assert (pool.constants["C"], pool.constants["HW"]) == (C, h * w)
    assert pool.constants["M"] == len(manifest.attributes)
