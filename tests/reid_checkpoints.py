"""Checkpoints in the layouts fast-reid and torchreid save, and reference embeddings written from their model code.

fast-reid (``Checkpointer.save``): ``{"model": state_dict, ...}`` with ``backbone.`` / ``heads.`` keys; its stem
max-pools with ``ceil_mode`` and no padding; GeneralizedMeanPoolingP holds ``heads.pool_layer.p``; the BN-neck is a
BatchNorm2d on the pooled [B, C, 1, 1] map (``heads.bottleneck.0``); pixels are normalised on the 0-255 scale.
torchreid (``save_checkpoint``): ``{"state_dict": ..., "epoch": ..., "rank1": ...}`` with ``module.`` prefixes from
``nn.DataParallel``; global average pooling, no neck; ``resnet50_fc512`` adds ``fc.*`` layers.
"""

import torch
import torch.nn.functional as nnf

from attrimeter.models.registry import create_model

FASTREID_MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255  # fast-reid's MODEL.PIXEL_MEAN / PIXEL_STD defaults
FASTREID_STD = torch.tensor([0.229, 0.224, 0.225]) * 255


def random_source(arch: str, last_stride: int = 1, **kwargs):
    """A randomly initialised ResNet with non-trivial BN statistics: the weights of the model to import."""
    model = create_model(arch, last_stride=last_stride, **kwargs)
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def _reference_features(source, x: torch.Tensor, ceil_stem: bool) -> torch.Tensor:
    """The backbone as the source codebase runs it (the stem's max pooling written out here)."""
    b = source.backbone
    y = b.relu(b.bn1(b.conv1(x)))
    y = nnf.max_pool2d(y, 3, 2, ceil_mode=True) if ceil_stem else nnf.max_pool2d(y, 3, 2, padding=1)
    return b.layer4(b.layer3(b.layer2(b.layer1(y))))


def random_neck(c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"weight": torch.rand(c, generator=gen) + 0.5, "bias": torch.zeros(c),  # fast-reid freezes the bias at 0
            "running_mean": torch.randn(c, generator=gen) * 0.1, "running_var": torch.rand(c, generator=gen) + 0.5,
            "num_batches_tracked": torch.tensor(1000)}


def fastreid_checkpoint(path, source, pool: str, neck: dict | None, module_prefix: bool = False,
                        pixel_buffers: bool = False, p: float = 2.7) -> None:
    c = source.num_features
    state = {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    if pool == "gem_p":  # GeneralizedMeanPoolingP: the only pooling with a tensor
        state["heads.pool_layer.p"] = torch.tensor([p])
    if neck is not None:
        state.update({f"heads.bottleneck.0.{k}": v for k, v in neck.items()})
    state["heads.weight"] = torch.randn(751, c)  # CLS_LAYER Linear / CircleSoftmax ... weight
    if pixel_buffers:  # older fast-reid saved the normalisation buffers
        state["pixel_mean"], state["pixel_std"] = FASTREID_MEAN.view(1, 3, 1, 1), FASTREID_STD.view(1, 3, 1, 1)
    if module_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 119},
                "iteration": 24000}, path)


def fastreid_embedding(source, x, pool: str, neck: dict | None, p: float = 2.7) -> torch.Tensor:
    images = (x * 255 - FASTREID_MEAN.view(1, 3, 1, 1)) / FASTREID_STD.view(1, 3, 1, 1)  # fast-reid feeds 0-255
    f = _reference_features(source, images, ceil_stem=True)
    if pool == "avg":
        pooled = nnf.adaptive_avg_pool2d(f, 1)
    else:
        pooled = nnf.adaptive_avg_pool2d(f.clamp(min=1e-6).pow(p), 1).pow(1.0 / p)
    if neck is not None:
        pooled = nnf.batch_norm(pooled, neck["running_mean"], neck["running_var"], neck["weight"], neck["bias"],
                                training=False, eps=1e-5)
    return pooled[..., 0, 0]


def torchreid_checkpoint(path, source, data_parallel: bool = True, fc: bool = False) -> None:
    c = source.num_features
    state = dict(source.backbone.state_dict())
    if fc:  # resnet50_fc512
        state.update({"fc.0.weight": torch.randn(512, c), "fc.0.bias": torch.zeros(512), "fc.1.weight": torch.ones(512),
                      "fc.1.bias": torch.zeros(512), "fc.1.running_mean": torch.zeros(512),
                      "fc.1.running_var": torch.ones(512)})
    state.update({"classifier.weight": torch.randn(751, 512 if fc else c), "classifier.bias": torch.zeros(751)})
    if data_parallel:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"state_dict": state, "epoch": 60, "rank1": 0.871, "optimizer": {"state": {}, "param_groups": []}},
               path)


def torchreid_embedding(source, x) -> torch.Tensor:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    images = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return _reference_features(source, images, ceil_stem=False).mean(dim=(2, 3))
