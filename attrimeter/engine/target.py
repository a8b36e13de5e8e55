"""Training, checkpointing and evaluation of the target ReID model (the model AttriMeter later explains).

Recipe ("Bag of Tricks" / fast-reid baseline, torchvision-free): ID cross-entropy with label smoothing on the BN-neck
output plus batch-hard triplet loss on the GeM feature, PK batches, Adam with linear warmup then cosine decay, flip /
pad-crop / random-erasing augmentation. Training can be bounded by wall-clock minutes: the learning-rate schedule then
runs on whichever of (iterations, time) is further along, so a run ends annealed, not cut off mid-schedule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from attrimeter import __version__
from attrimeter.config import save_config, to_dict
from attrimeter.data.augment import augment_batch, to_float
from attrimeter.data.formats import ReIDDataset, Sample, load_dataset
from attrimeter.data.images import read_images
from attrimeter.data.sampling import PKSampler
from attrimeter.engine.evaluation import RankMetrics, evaluate_rank
from attrimeter.engine.runs import RunConfig, Schedule, read_checkpoint, write_checkpoint
from attrimeter.models.registry import create_model
from attrimeter.models.reid import ReIDModel, build_model

__all__ = [
    "PROFILES",
    "TargetCheckpoint",
    "TargetTrainConfig",
    "batch_hard_triplet",
    "embed_and_rank",
    "embed_images",
    "evaluate_target",
    "import_target",
    "load_target",
    "save_target",
    "target_from_payload",
    "target_payload",
    "train_target",
]

CHECKPOINT_FORMAT = "attrimeter-target"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TargetTrainConfig(RunConfig):
    """Configuration of a target training run (see ``PROFILES`` for the named presets)."""

    arch: str = "resnet18"
    width: float = 1.0
    last_stride: int = 1
    gem_p: float = 3.0
    pretrained: str | None = None
    image_size: tuple[int, int] = (128, 64)
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    triplet_weight: float = 1.0
    pad: int = 10
    erase: float = 0.5

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.image_size[0] < 32 or self.image_size[1] < 16:
            problems.append(f"image_size must be at least (32, 16), got {self.image_size}")
        return problems


PROFILES: dict[str, dict[str, Any]] = {
    # 24 epochs (528 iterations on the demo data, about 3 minutes on 2 CPU cores): leaves the demo's interpreters
    # their share of its budget. Budgets are iterations, so every run of a config trains the same steps; the
    # 30-minute guard only stops a machine far slower than planned. Training from scratch (no downloads, so no
    # ImageNet start) wants a higher lr and milder pad/erasing than the fine-tuning recipe: in 4.5 minutes the
    # recipe's 3.5e-4 / 10 / 0.5 reached rank-1 0.55 on the demo data, these settings 0.92
    # (benchmarks/results/target_quick_cpu.md).
    "quick": {"arch": "resnet18", "width": 0.5, "epochs": 24, "max_minutes": 30.0, "lr": 1e-3, "pad": 4,
              "erase": 0.3},
    "full": {"arch": "resnet50", "width": 1.0, "image_size": (256, 128), "epochs": 120, "max_minutes": None},
}


@dataclass
class TargetCheckpoint:
    """A loaded target: the model (eval mode) and its self-description."""

    model: ReIDModel
    meta: dict[str, Any]

    @property
    def image_size(self) -> tuple[int, int]:
        """Input ``(height, width)`` the model was trained at."""
        h, w = self.meta["image_size"]
        return int(h), int(w)


def batch_hard_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al.): hardest positive and hardest negative per anchor.

    Args:
        feats: [B, C] features.
        labels: [B] identity labels.
        margin: Margin; 0 selects the soft-margin form log(1 + exp(d_ap - d_an)).

    Returns:
        Scalar loss.
    """
    sq = (feats * feats).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).amax(1)
    d_an = dist.masked_fill(same, float("inf")).amin(1)
    if margin > 0:
        return nnf.relu(d_ap - d_an + margin).mean()
    return nnf.softplus(d_ap - d_an).mean()


def target_payload(model: ReIDModel, meta: dict[str, Any]) -> dict[str, Any]:
    """What a target checkpoint holds (architecture, schema, image size, normalisation, weights).

    Args:
        model: The model.
        meta: Extra description (must hold ``image_size``; ``schema`` when trained here on an attribute data set).

    Returns:
        The payload :func:`save_target` writes (interpreter checkpoints embed it).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "attrimeter": __version__,
        "model_config": model.config,
        "normalization": {
            "mean": model.pixel_mean.flatten().tolist(),
            "std": model.pixel_std.flatten().tolist(),
        },
        **meta,
        "state_dict": model.state_dict(),
    }


def save_target(model: ReIDModel, path: str | Path, meta: dict[str, Any]) -> None:
    """Write a self-describing target checkpoint (see :func:`target_payload`).

    Args:
        model: The trained model.
        path: Output ``.pt`` file (written atomically).
        meta: Extra description (must hold ``image_size``; ``schema`` when trained here on an attribute data set).
    """
    write_checkpoint(target_payload(model, meta), path)


def import_target(
    weights: str | Path, out_dir: str | Path, image_size: tuple[int, int] = (256, 128), **options: Any
) -> Path:
    """Write a fast-reid or torchreid checkpoint as ``out_dir/target.pt``, embedding exactly as in its codebase.

    Args:
        weights: The fast-reid / torchreid checkpoint.
        out_dir: Run folder (created).
        image_size: ``(height, width)`` the model was trained at (both codebases default to 256x128).
        **options: ``arch``, ``style``, ``last_stride``, ``pooling``, ``gem_p`` of
            :func:`~attrimeter.models.convert.import_reid_model`.

    Returns:
        The written ``target.pt``.

    Raises:
        FileNotFoundError: If ``weights`` does not exist.
        ValueError: If the checkpoint cannot be imported (see :func:`~attrimeter.models.convert.import_reid_model`).
    """
    from attrimeter.models.convert import import_reid_model

    model, description = import_reid_model(weights, **options)
    out = Path(out_dir) / "target.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    # No "schema": an imported model was trained on identities only, so any attribute data set can explain it.
    save_target(model, out, {"image_size": list(image_size), "imported": description})
    return out


def load_target(path: str | Path, map_location: str | torch.device = "cpu") -> TargetCheckpoint:
    """Load a target checkpoint written by :func:`save_target`.

    Args:
        path: The ``.pt`` file.
        map_location: Device to load onto.

    Returns:
        The model in eval mode with its metadata.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a target checkpoint of a known version, or its weights do not fit its architecture.
    """
    ck = target_from_payload(read_checkpoint(path, "target checkpoint", map_location), str(path))
    ck.model.to(map_location)  # load_state_dict copies into the freshly built (CPU) model
    return ck


def target_from_payload(payload: object, source: str) -> TargetCheckpoint:
    """Rebuild a target from a :func:`target_payload` (a file's content, or the copy inside an interpreter's).

    Args:
        payload: The stored payload.
        source: Where it came from, for messages.

    Returns:
        The model in eval mode with its metadata.

    Raises:
        ValueError: If it is not a target payload of a known version, or its weights do not fit its architecture.
    """
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{source} is not an AttriMeter target checkpoint (format {CHECKPOINT_FORMAT!r})")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{source}: unsupported target checkpoint version {payload.get('version')!r}")
    try:
        model = build_model(payload["model_config"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"{source}: weights do not match architecture {payload.get('model_config')}: {e}") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return TargetCheckpoint(model=model, meta=meta)


@torch.no_grad()
def embed_images(
    model: ReIDModel,
    samples: list[Sample],
    image_size: tuple[int, int],
    batch_size: int = 128,
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed image files with a ReID model (eval mode, decoded chunk by chunk).

    Args:
        model: Any model mapping float [B,3,H,W] in [0,1] to embeddings [B,C].
        samples: The images.
        image_size: ``(height, width)`` to resize to.
        batch_size: Images per forward pass.
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        float32 embeddings [N, C].
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = samples[s:s + batch_size]
        x = to_float(torch.from_numpy(read_images([c.path for c in chunk], image_size, progress=False)))
        out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)


def embed_and_rank(
    model: ReIDModel, data: ReIDDataset, image_size: tuple[int, int], batch_size: int = 128, progress: bool = True
) -> tuple[RankMetrics, np.ndarray, np.ndarray]:
    """Embed a data set's query and gallery images and evaluate them under the Market-1501 protocol.

    Args:
        model: The ReID model.
        data: The data set (its ``query`` and ``gallery`` splits are used).
        image_size: ``(height, width)`` the model takes.
        batch_size: Images per forward pass.
        progress: Show progress bars.

    Returns:
        ``(metrics, query embeddings [Q, C], gallery embeddings [N, C])``, the embeddings for reuse (e.g. pictures).
    """
    qf = embed_images(model, data.query, image_size, batch_size, progress, desc="embed query")
    gf = embed_images(model, data.gallery, image_size, batch_size, progress, desc="embed gallery")
    metrics = evaluate_rank(
        qf, gf,
        np.array([s.pid for s in data.query]), np.array([s.pid for s in data.gallery]),
        np.array([s.camid for s in data.query]), np.array([s.camid for s in data.gallery]),
    )
    return metrics, qf, gf


def train_target(
    data_root: str | Path,
    out_dir: str | Path,
    config: TargetTrainConfig = TargetTrainConfig(),
    progress: bool = True,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train a target ReID model and write ``target.pt``, ``config.yaml`` and ``train_log.json`` in ``out_dir``.

    Args:
        data_root: A Market-1501 / DukeMTMC-reID style folder (real or synthetic).
        out_dir: Run folder (created).
        config: The resolved configuration.
        progress: Show progress bars.
        evaluate: Evaluate on query/gallery at the end and store the metrics in the log.

    Returns:
        The training log (timings, losses, and the metrics if evaluated).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    device = config.torch_device()
    data = load_dataset(data_root, attributes=False)  # a target needs identities only (no .mat, e.g. plain Market)
    pids = data.train_pids
    label_of = {pid: i for i, pid in enumerate(pids)}
    labels = torch.tensor([label_of[s.pid] for s in data.train])
    images = torch.from_numpy(read_images([s.path for s in data.train], config.image_size, progress,
                                          desc="decode train"))
    model = create_model(config.arch, num_classes=len(pids), pretrained=config.pretrained, width=config.width,
                         last_stride=config.last_stride, gem_p=config.gem_p).to(device)
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)  # no decay on BN, biases and GeM's p
    optim = torch.optim.Adam([{"params": decay, "weight_decay": config.weight_decay, "base_lr": config.lr},
                              {"params": no_decay, "weight_decay": 0.0, "base_lr": config.lr}], lr=config.lr)
    sampler = PKSampler(labels.numpy(), config.p_ids, config.k_instances, seed=config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    log: dict[str, Any] = {"train_images": len(data.train), "train_ids": len(pids), "losses": []}
    schedule = Schedule(config, len(sampler))
    bar = tqdm(total=1000, desc=f"train {config.arch}", unit="‰", disable=not progress)
    model.train()
    for idx in schedule.batches(sampler, optim):
        x = augment_batch(to_float(images[idx]), gen, flip=config.flip, pad=config.pad, erase=config.erase)
        x, y = x.to(device, non_blocking=True), labels[idx].to(device)
        feat, logits = model.forward_train(x)
        ce = nnf.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        tri = batch_hard_triplet(feat, y, config.triplet_margin)
        loss = ce + config.triplet_weight * tri
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at iteration {schedule.iteration} (loss {loss.item()}); "
                                     "lower the lr")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.iteration += 1
        it = schedule.iteration
        if it % 10 == 0:
            acc = (logits.argmax(1) == y).float().mean().item()
            log["losses"].append({"iter": it, "ce": ce.item(), "triplet": tri.item(), "acc": acc})
            bar.set_postfix(ce=f"{ce.item():.2f}", tri=f"{tri.item():.2f}", acc=f"{acc:.2f}", it=it)
        bar.update(int(schedule.progress * 1000) - bar.n)
    bar.close()
    log.update(iterations=schedule.iteration, epochs=schedule.iteration / len(sampler),
               stopped_early=schedule.stopped_early,
               train_seconds=schedule.elapsed,
               images_per_second=schedule.iteration * config.p_ids * config.k_instances / max(schedule.elapsed, 1e-9))
    model.eval()
    meta = {
        "schema": data.schema.name,
        "image_size": list(config.image_size),
        "train_ids": pids,
        "data_root": str(Path(data_root).resolve()),
        "train_config": to_dict(config),
    }
    save_target(model, out / "target.pt", meta)
    save_config(config, out / "config.yaml")
    if evaluate:
        log["metrics"] = embed_and_rank(model, data, config.image_size, config.eval_batch_size, progress)[0].as_dict()
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


def evaluate_target(
    checkpoint: str | Path, data_root: str | Path, batch_size: int = 128, progress: bool = True
) -> RankMetrics:
    """Market-protocol mAP / CMC of a target checkpoint on a data set's query and gallery.

    Args:
        checkpoint: A ``target.pt``.
        data_root: The data folder.
        batch_size: Images per forward pass.
        progress: Show progress bars.

    Returns:
        The metrics.
    """
    ck = load_target(checkpoint)
    # Any data set will do (cross-domain evaluation is a standard ReID experiment); attributes are not needed.
    data = load_dataset(data_root, attributes=False)
    return embed_and_rank(ck.model, data, ck.image_size, batch_size, progress)[0]
