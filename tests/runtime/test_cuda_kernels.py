"""The cuda-python launcher of the AOT explain kernels (runtime/cuda_kernels.py, runtime/explain_kernels.py).

The CPU machines have no GPU, so the launcher runs against an in-process stand-in of the CUDA driver
(tests/cuda_fakes.py: device memory as byte arrays at fake addresses, the explain kernel replaced by numpy reading and
writing that memory through the launch's parameters), which checks parameter packing, launch geometry, shared memory,
target choice and clean-up; parity with the numpy twin runs only where a CUDA driver is.
"""

import ctypes

import numpy as np
import pytest
from cuda_fakes import drv

from attrimeter.artefact.device import cuda_device
from attrimeter.artefact.kernels import KernelIndex, KernelIndexEntry
from attrimeter.runtime import cuda_kernels as ck
from attrimeter.runtime import explain_kernels as ek
from attrimeter.runtime.decompose import Decomposition, explain_rows
from attrimeter.runtime.errors import GalleryError, InputError, UnknownIdError

# --------------------------------------------------------------------------------------------------- launcher (CPU)

C, M = 24, 5


@pytest.fixture(scope="module")
def aot_export(tmp_path_factory):
    """An export folder with the explain kernels cross-compiled for sm_80 (the launcher needs nothing else)."""
    pytest.importorskip("triton", reason="the AOT kernels are compiled with Triton")
    from attrimeter.export import aot

    out = tmp_path_factory.mktemp("aot_export")
    aot.compile_kernels(out / "kernels", aot.kernel_specs(C, 8, M, 3.0, 1e-6, "float32")[1:], ("sm_80",))
    return out


@pytest.fixture
def explainer(aot_export, fake_cuda):
    out = aot_export
    fake_cuda.shape = (M, C)
    for name in ek.EXPLAIN_KERNELS:
        meta = ek.load_explain_kernel(out / "kernels" / "sm_80" / f"{name}.json")
        fake_cuda.module_params[meta.cubin] = [p for p, _ in meta.params]
    explainer = ck.CudaExplainer(out / "kernels" / "index.json", C, M)
    yield explainer
    explainer.close()


def _gallery(rng, n: int) -> np.ndarray:
    return rng.normal(size=(n, M + 1, C)).astype(np.float16)


def test_launch_geometry_and_parameters(explainer, fake_cuda, aot_export, rng):
    out = aot_export
    assert explainer.target == "sm_80"  # an sm_86 device runs the sm_80 cubins
    assert sorted(fake_cuda.modules.values()) == sorted(
        (out / "kernels" / "sm_80" / f"{name}.cubin").read_bytes() for name in ek.EXPLAIN_KERNELS)
    assert fake_cuda.attributes == []  # 32 B of shared memory: no opt-in
    gallery = _gallery(rng, 37)
    explainer.set_gallery(gallery)
    q = rng.normal(size=(3, M + 1, C)).astype(np.float32)
    ids = rng.integers(0, 37, size=(3, 4))
    result = explainer.explain(q, ids)

    launch = fake_cuda.launches[-1]
    meta = explainer.kernels["explain"]
    assert launch["grid"] == (12, 1, 1) and launch["block"] == (meta.threads, 1, 1) == (128, 1, 1)
    assert launch["shared"] == meta.shared_bytes and launch["stream"] == 0x5
    names = [name for name, _, _ in launch["params"]]
    assert names == ["q_ptr", "g_ptr", "ids_ptr", "d_ptr", "dk_ptr", "sh_ptr", "dhat_ptr", "score_ptr", "err_ptr",
                     "K", "N", "stride_iq", "global_scratch", "profile_scratch"]
    pointers = {}
    for name, value, ctype in launch["params"]:
        if name in ("K", "N", "stride_iq"):
            assert ctype is ctypes.c_int32 and isinstance(value, ctypes.c_int32)
        else:
            assert ctype is None and isinstance(value, drv.CUdeviceptr)
            pointers[name] = int(value)
    assert {n: v.value for n, v, _ in launch["params"] if n in ("K", "N", "stride_iq")} == \
        {"K": 4, "N": 37, "stride_iq": 4}
    assert pointers["global_scratch"] == pointers["profile_scratch"] == 0
    assert pointers["g_ptr"] == explainer._buffers["gallery"][0]
    assert all(p % 16 == 0 for p in pointers.values())  # the kernels were compiled for 16-byte aligned buffers
    assert len({p for n, p in pointers.items() if "scratch" not in n}) == 9  # distinct buffers

    ref = explain_rows(q, gallery[ids])
    assert isinstance(result, Decomposition)  # the device-index protocol's one result type
    for key in Decomposition._fields:
        assert getattr(result, key).dtype == np.float32
        np.testing.assert_allclose(getattr(result, key), getattr(ref, key), rtol=1e-5, atol=1e-6, err_msg=key)
    assert not explainer.can_rank(False, "l2") and not explainer.can_rank(True, "l2")  # FAISS ranks
    with pytest.raises(NotImplementedError, match="does not rank"):
        explainer.search(q, 4, None)
    assert fake_cuda.ctx_depth == 0  # every push popped


def test_weighted_explain_passes_the_weights(explainer, fake_cuda, rng):
    gallery = _gallery(rng, 20)
    explainer.set_gallery(gallery)
    q = rng.normal(size=(2, M + 1, C)).astype(np.float32)
    ids = rng.integers(0, 20, size=(2, 6))
    weights = rng.uniform(0.0, 2.0, size=M)
    weights[0] = 0.0  # e.g. "ignore clothing colours"
    result = explainer.explain(q, ids, weights=weights)
    names = [name for name, _, _ in fake_cuda.launches[-1]["params"]]
    assert names[3] == "w_ptr" and len(names) == 15
    ref = explain_rows(q, gallery[ids], weights.astype(np.float32))
    np.testing.assert_allclose(result.scores, ref.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.d, ref.d, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="all zero"):
        explainer.explain(q, ids, weights=np.zeros(M))


def test_append_keeps_earlier_rows(explainer, rng):
    first, second = _gallery(rng, 3), _gallery(rng, 300)  # the second append outgrows the buffer: copied over
    explainer.set_gallery(first)
    explainer.append_gallery(second)
    assert len(explainer) == 303
    gallery = np.concatenate([first, second])
    q = rng.normal(size=(2, M + 1, C)).astype(np.float32)
    ids = np.array([[0, 2, 3, 302], [1, 150, 0, 0]])
    np.testing.assert_allclose(explainer.explain(q, ids).d_k, explain_rows(q, gallery[ids]).d_k, rtol=1e-5)
    explainer.set_gallery(second[:5])  # replaces
    assert len(explainer) == 5


def test_bad_requests_are_refused_before_any_launch(explainer, fake_cuda, rng):
    q = rng.normal(size=(1, M + 1, C)).astype(np.float32)
    with pytest.raises(GalleryError, match="empty"):
        explainer.explain(q, np.zeros((1, 1), np.int64))
    explainer.set_gallery(_gallery(rng, 10))
    with pytest.raises(UnknownIdError, match="gallery id 10 .* holds 10 entries"):
        explainer.explain(q, np.array([[3, 10]]))
    with pytest.raises(UnknownIdError, match="gallery id -1"):
        explainer.explain(q, np.array([[-1]]))
    with pytest.raises(InputError, match="queries"):
        explainer.explain(q[:, :M], np.array([[0]]))
    bad = q.copy()
    bad[0, 2, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        explainer.explain(bad, np.array([[0]]))
    with pytest.raises(InputError, match="ids"):
        explainer.explain(q, np.array([[0.5]]))
    with pytest.raises(InputError, match="gallery rows"):
        explainer.append_gallery(np.zeros((2, M, C), np.float16))
    assert fake_cuda.launches == []


def test_non_finite_gallery_row_is_named_and_the_counter_resets(explainer, rng):
    gallery = _gallery(rng, 8)
    gallery[5, 3, 1] = np.inf
    explainer.set_gallery(gallery)
    q = rng.normal(size=(1, M + 1, C)).astype(np.float32)
    with pytest.raises(GalleryError, match=r"gallery ids \[5\]"):
        explainer.explain(q, np.array([[1, 5, 2]]))
    # The error counter is zeroed before every launch: a clean request afterwards passes.
    result = explainer.explain(q, np.array([[1, 2]]))
    np.testing.assert_allclose(result.d, explain_rows(q, gallery[[[1, 2]]]).d, rtol=1e-5)


def test_close_releases_everything_once(explainer, fake_cuda, rng):
    explainer.set_gallery(_gallery(rng, 4))
    explainer.explain(rng.normal(size=(1, M + 1, C)).astype(np.float32), np.array([[0, 1]]))
    assert fake_cuda.device and fake_cuda.modules and fake_cuda.retained == 1
    explainer.close()
    assert fake_cuda.device == {} and fake_cuda.modules == {} and fake_cuda.streams == set()
    assert fake_cuda.retained == 0 and fake_cuda.ctx_depth == 0
    explainer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        explainer.set_gallery(_gallery(rng, 1))


def test_cuda_errors_name_the_call_and_leak_nothing(aot_export, fake_cuda):
    fake_cuda.fail["cuStreamCreate"] = drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY
    with pytest.raises(RuntimeError, match=r"cuStreamCreate failed: CUDA_ERROR_OUT_OF_MEMORY \(2\)"):
        ck.CudaExplainer(aot_export / "kernels" / "index.json", C, M)
    assert fake_cuda.modules == {} and fake_cuda.retained == 0 and fake_cuda.ctx_depth == 0


def test_large_shared_memory_is_opted_into(aot_export, fake_cuda, tmp_path):
    import json
    import shutil

    shutil.copytree(aot_export / "kernels", tmp_path / "kernels")
    path = tmp_path / "kernels" / "sm_80" / "explain.json"
    meta = json.loads(path.read_text())
    meta["shared_bytes"] = 64 * 1024
    path.write_text(json.dumps(meta))
    explainer = ck.CudaExplainer(tmp_path / "kernels" / "index.json", C, M)
    try:
        (function, attrib, value), = fake_cuda.attributes
        assert attrib == drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES and value == 65536
    finally:
        explainer.close()
    fake_cuda.optin = 48 * 1024 + 512  # e.g. a smaller GPU: the kernel cannot run there
    with pytest.raises(ValueError, match=r"needs 65536 \+ 0 B of shared memory per block, this device allows"):
        ck.CudaExplainer(tmp_path / "kernels" / "index.json", C, M)
    assert fake_cuda.modules == {} and fake_cuda.retained == 0


def test_kernels_for_other_shapes_are_refused(aot_export, fake_cuda):
    with pytest.raises(ValueError, match="compiled for .*'C': 24.*C=32"):
        ck.CudaExplainer(aot_export / "kernels" / "index.json", 32, M)
    with pytest.raises(ValueError, match=r"kernel index .*nowhere\.json is unreadable"):
        ck.CudaExplainer(aot_export / "kernels" / "nowhere.json", C, M)


def _index(**shared: int) -> KernelIndex:
    return KernelIndex({t: {k: KernelIndexEntry(f"{t}/{k}.json", "_explain_kernel", s, 128) for k in ek.EXPLAIN_KERNELS}
                        for t, s in shared.items()})


def test_target_choice_follows_the_c_launcher():
    index = _index(sm_80=32, sm_86=32, sm_90=32)
    assert ek.choose_target(index, 90, 232448) == "sm_90"
    assert ek.choose_target(index, 86, 101376) == "sm_86"
    assert ek.choose_target(index, 89, 101376) == "sm_86"  # the highest lower minor of the same major
    assert ek.choose_target(_index(sm_80=120_000, sm_86=32), 87, 166912) == "sm_86"
    with pytest.raises(ValueError, match=r"sm_80 \(needs 120000 B shared memory.*--targets sm_86"):
        ek.choose_target(_index(sm_80=120_000), 86, 101376)
    with pytest.raises(ValueError, match="arch-specific sm_90a"):
        ek.choose_target(_index(sm_90=32), 91, 232448)  # hypothetical 9.1: sm_90a cubins run on 9.0 only
    with pytest.raises(ValueError, match="compiled for: sm_80, sm_86, sm_90.*--targets sm_75"):
        ek.choose_target(index, 75, 65536)
    incomplete = KernelIndex({"sm_80": {"explain": KernelIndexEntry("x", "_explain_kernel", 32, 128)}})
    with pytest.raises(ValueError, match="compiled for: none"):
        ek.choose_target(incomplete, 80, 166912)


# --------------------------------------------------------------------------------------------------- GPU machine


def test_explainer_matches_numpy(tmp_path, rng):
    missing = ck.cuda_available()
    if missing is not None:
        pytest.skip(missing)
    pytest.importorskip("triton", reason="the AOT kernels are compiled with Triton")
    from attrimeter.export import aot

    device = cuda_device()
    assert device is not None
    target = f"sm_{device.cc}"
    if target not in aot.TARGETS:
        pytest.skip(f"no AOT target is defined for this {target} GPU")
    aot.compile_kernels(tmp_path / "kernels", aot.kernel_specs(C, 8, M, 3.0, 1e-6, "float32")[1:], (target,))
    with ck.CudaExplainer(tmp_path / "kernels" / "index.json", C, M) as explainer:
        gallery = _gallery(rng, 1000)
        gallery[7] = gallery[3]  # a zero distance: shares fall back to 1/M
        explainer.set_gallery(gallery[:600])
        explainer.append_gallery(gallery[600:])
        q = rng.normal(size=(5, M + 1, C)).astype(np.float32)
        q[0] = gallery[3]
        ids = rng.integers(0, 1000, size=(5, 10))
        ids[0, :2] = [3, 7]
        weights = rng.uniform(0.0, 1.0, size=M).astype(np.float32)
        for w in (None, weights):
            got = explainer.explain(q, ids, weights=w)
            ref = explain_rows(q, gallery[ids], w)
            for key in Decomposition._fields:
                np.testing.assert_allclose(getattr(got, key), getattr(ref, key), rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(got.shares[0, :2], 1.0 / M)
        with pytest.raises(UnknownIdError):
            explainer.explain(q, np.full((5, 1), 1000))
