"""Interpreter training on a CUDA GPU: one batch's loss and gradients equal the CPU's, and steps stay finite.

GPU only (skipped without CUDA): ``benchmarks/gpu_check.py`` runs it on a lent GPU. The loss is that of
docs/architecture.md §3, with its default weights (1 / 10 / 100), built from the public loss functions, through the
pure-torch pooling (what training uses) and through the fused Triton kernel with its autograd backward.
"""

import copy

import pytest
import torch

from attrimeter.engine.losses import attribute_prior, metric_distillation, positive_ratio, weighted_bce
from attrimeter.engine.target import load_target
from attrimeter.kernels.attr_distance import attr_distance_reference
from attrimeter.models.interpreter import AttriMeter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py)")
M = 26
B = 8  # 4 identities x 2 images


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def full_fp32():
    """Plain fp32 matmuls and convolutions on the GPU (no TF32), so CPU and GPU agree to fp32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def batch(tiny_target):
    """A model with non-trivial attention maps, a batch of images, attribute labels and pair differences."""
    target = load_target(tiny_target).model
    model = AttriMeter(target, M, shared="layer3")
    with torch.no_grad():
        model.head[2].weight.normal_(std=0.05)  # zero at init (A = 1, d_hat = d): make the maps differ
    h, w = 64, 32
    images = torch.rand(B, 3, h, w)
    pids = torch.arange(B) // 2
    labels = (torch.rand(B // 2, M) < 0.4).long()[pids]
    return model, images, labels


def _loss(model: AttriMeter, images: torch.Tensor, labels: torch.Tensor, pool=None) -> torch.Tensor:
    out = model(images, pool=pool)
    pairs = attr_distance_reference(out.stacked(), out.stacked())
    i, j = torch.triu_indices(B, B, offset=1, device=images.device)
    differ = (labels[i] != labels[j]).float()
    ratio = positive_ratio(labels.float())
    return (metric_distillation(pairs.d[i, j], pairs.d_hat[i, j]) + 10 * attribute_prior(pairs.shares[i, j], differ)
            + 100 * weighted_bce(out.attr_logits, labels, ratio))


def _grads(model: AttriMeter) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("pool", ["reference", "triton"])
def test_cuda_loss_and_gradients_match_the_cpu(batch, full_fp32, pool):
    from attrimeter.kernels.masked_gem_pool import masked_gem_pool

    model, images, labels = batch
    gpu = copy.deepcopy(model).to("cuda")
    cpu_loss = _loss(model, images, labels)
    cpu_loss.backward()
    gpu_loss = _loss(gpu, images.cuda(), labels.cuda(), masked_gem_pool if pool == "triton" else None)
    gpu_loss.backward()
    assert torch.isfinite(gpu_loss)
    # fp32 throughout: the kernel's forward uses IEEE products, its backward 3xTF32 (fp32-accurate, other order).
    assert _relative(gpu_loss, cpu_loss) < 1e-4
    want, got = _grads(model), _grads(gpu)
    assert want.keys() == got.keys() and "head.2.weight" in want
    for name, g in want.items():
        assert _relative(got[name], g) < (1e-3 if pool == "reference" else 5e-3), name


def test_adam_steps_on_cuda_stay_finite_and_move_the_head(batch):
    model, images, labels = batch
    gpu = model.to("cuda")
    before = gpu.head[2].weight.detach().clone()
    optim = torch.optim.Adam([p for p in gpu.parameters() if p.requires_grad], lr=1e-3)
    x, y = images.cuda(), labels.cuda()
    for _ in range(5):
        loss = _loss(gpu, x, y)
        assert torch.isfinite(loss)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    assert not torch.equal(gpu.head[2].weight.detach(), before)
