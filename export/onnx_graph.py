"""What the ONNX export traces: the grafted model with images in and four fixed outputs out (docs/architecture.md §5).

:class:`ExportGraph` wraps a trained interpreter for ``torch.onnx.export`` in one of two flavours:

* ``portable``: the masked pooling is the factorised form of
  :func:`~attrimeter.kernels.masked_gem_pool.masked_gem_pool_reference` (Pow, MatMul, ReduceMean, …): standard ONNX
  ops only, for ONNX Runtime and TensorRT.
* ``plugin``: the masked pooling is the torch custom op ``attrimeter::masked_gem_pool`` (so ``torch.export`` keeps it
  as one node), translated to ONE ONNX node ``attrimeter::MaskedGemPool`` (inputs F, Z, scale, shift; outputs f,
  f_k; attributes p, eps, p_int, num_attributes, channels, and plugin_namespace / aot for TensorRT's parser) for
  TensorRT's plugin (:mod:`attrimeter.export.tensorrt_engine`). :func:`register_onnx_schema` registers that node's
  schema with ``onnx.defs`` so ``onnx.checker`` validates it too.

Importing this module registers the custom op with torch. The export itself, its verification and its manifest are
:mod:`attrimeter.export.onnx_export`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from attrimeter.artefact.contract import FLAVORS, PLUGIN_NAME, PLUGIN_NAMESPACE
from attrimeter.kernels import integer_exponent
from attrimeter.kernels.masked_gem_pool import masked_gem_pool_reference, qexp

__all__ = ["ExportGraph", "register_onnx_schema", "translation_table"]


# --------------------------------------------------------------------------------------------------------------------
# The plugin op: a torch custom op (so torch.export keeps it as one node) and its ONNX schema
# --------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("attrimeter::masked_gem_pool", mutates_args=())
def _masked_gem_pool_op(
    F: Tensor, Z: Tensor, scale: Tensor, shift: Tensor, p: float, eps: float
) -> tuple[Tensor, Tensor]:
    f, f_k = masked_gem_pool_reference(F, Z, p, eps, scale, shift)
    return f.contiguous(), f_k.contiguous()


@_masked_gem_pool_op.register_fake
def _(F: Tensor, Z: Tensor, scale: Tensor, shift: Tensor, p: float, eps: float) -> tuple[Tensor, Tensor]:
    B, C = F.shape[:2]
    return F.new_empty((B, C)), F.new_empty((B, Z.shape[1], C))


def register_onnx_schema() -> None:
    """Register ``attrimeter::MaskedGemPool`` (version 1) with ``onnx.defs``; idempotent.

    The schema lets ``onnx.checker`` and onnxscript build and check the plugin node like a standard op.
    """
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(PLUGIN_NAME, PLUGIN_NAMESPACE):
        return
    t = "T"
    attr = OpSchema.Attribute
    schema = OpSchema(
        PLUGIN_NAME, PLUGIN_NAMESPACE, 1,
        doc="Fused masked GeM pooling: f = BN(GeM(F)), f_k = BN(GeM(F * qexp(Z_k))) (docs/architecture.md §3).",
        inputs=[OpSchema.FormalParameter(name, t, doc) for name, doc in (
            ("F", "feature map [B, C, h, w]"), ("Z", "attention logits [B, M, h, w]"),
            ("scale", "BN-neck scale [C]"), ("shift", "BN-neck shift [C]"))],
        outputs=[OpSchema.FormalParameter("f", t, "embedding [B, C]"),
                 OpSchema.FormalParameter("f_k", t, "attribute embeddings [B, M, C]")],
        type_constraints=[(t, ["tensor(float)", "tensor(float16)"], "fp32 or fp16; accumulation is fp32")],
        attributes=[
            attr("p", OpSchema.AttrType.FLOAT, "GeM exponent"),
            attr("eps", OpSchema.AttrType.FLOAT, "GeM clamp floor"),
            attr("p_int", OpSchema.AttrType.INT, "p as an integer 1..4 (multiplications), 0 for the generic path"),
            attr("num_attributes", OpSchema.AttrType.INT, "M"),
            attr("channels", OpSchema.AttrType.INT, "C"),
            # Read by TensorRT's ONNX parser, which finds plugins by op_type + this namespace (not the domain) and
            # takes the AOT implementation only when asked.
            attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace: attrimeter"),
            attr("aot", OpSchema.AttrType.INT, "1: use the plugin's ahead-of-time (Triton PTX) implementation"),
        ],
    )  # fmt: skip
    onnx.defs.register_schema(schema)


def _translate_masked_gem_pool(F: Any, Z: Any, scale: Any, shift: Any, p: float, eps: float) -> Any:
    """The onnxscript translation of the custom op: one ``attrimeter::MaskedGemPool`` node."""
    import onnxscript

    register_onnx_schema()
    op = onnxscript.values.Opset(PLUGIN_NAMESPACE, 1)
    # F and Z shapes are static but for B, so M and C are known here.
    return op.MaskedGemPool(F, Z, scale, shift, p=float(p), eps=float(eps), p_int=integer_exponent(float(p)),
                            num_attributes=int(Z.shape[1]), channels=int(F.shape[1]),
                            plugin_namespace=PLUGIN_NAMESPACE, aot=1, _outputs=2)


def translation_table() -> dict[Any, Any]:
    """The ``custom_translation_table`` ``torch.onnx.export`` needs for a ``plugin`` graph.

    Returns:
        The custom op's overload -> its onnxscript translation (one ``attrimeter::MaskedGemPool`` node).
    """
    return {torch.ops.attrimeter.masked_gem_pool.default: _translate_masked_gem_pool}


# --------------------------------------------------------------------------------------------------------------------
# The exported module
# --------------------------------------------------------------------------------------------------------------------


class ExportGraph(nn.Module):
    """The grafted model as the export sees it: images in, the four fixed outputs out.

    Args:
        model: A trained :class:`~attrimeter.models.interpreter.AttriMeter` (deep-copied, so the caller's model keeps
            its dtype).
        flavor: ``"portable"`` or ``"plugin"``.
        fp16: Build the FP16 graph.
    """

    def __init__(self, model: nn.Module, flavor: str = "portable", fp16: bool = False) -> None:
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        self.flavor = flavor
        self.dtype = torch.float16 if fp16 else torch.float32
        self.model = copy.deepcopy(model).to(self.dtype).eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run the export graph.

        Args:
            images: Float32 RGB in [0, 1], ``[B, 3, H, W]``.

        Returns:
            ``(embedding [B, C], attr_embeddings [B, M, C], aam [B, M, h, w], attr_logits [B, M])``, float32.
        """
        m = self.model
        shared = m.shared_features(images.to(self.dtype))
        features = m.target_features(shared)
        z = m.head(m.late(shared))
        if self.flavor == "plugin":
            f, f_k = torch.ops.attrimeter.masked_gem_pool(features, z, m.scale, m.shift, m.p, m.eps)
        else:
            f, f_k = masked_gem_pool_reference(features, z, m.p, m.eps, m.scale, m.shift)
        attr_logits = m.classify(f_k, z)
        return f.float(), f_k.float(), qexp(z).float(), attr_logits.float()
