"""Supervised classification with the DeiT-III recipe (Touvron, Cord, Jégou, 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import one_hot
from timm.layers import trunc_normal_
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..data import EvalTransform, ThreeAugment
from ..models import RegisterViT
from .base import ObjectiveModule

HEAD_POOLS = ("cls", "cls+mean")


class SupervisedModule(ObjectiveModule):
    """RegisterViT and a linear head trained with DeiT-III's recipe: 3-Augment, Mixup/CutMix
    (timm), binary cross-entropy, LAMB, warmup then cosine.

    Args:
        backbone: the register ViT (its drop_path_rate and layerscale_init are part of the
            recipe: DeiT-III ViT-B uses 0.1 and 1e-4).
        num_classes: classifier outputs (linked from the data).
        image_size: training and evaluation image side (linked from the data).
        head_pool: features for the head: "cls", or "cls+mean" ([CLS] and mean patch token).
        mixup_alpha: Mixup alpha (0 turns Mixup off).
        cutmix_alpha: CutMix alpha (0 turns CutMix off).
        label_smoothing: label smoothing of the targets.
        bce_loss: binary cross-entropy on the (mixed) targets, as DeiT-III; else soft-target CE.
        crop: training crop of 3-Augment, "src" (simple random crop) or "rrc".
        color_jitter: 3-Augment's colour-jitter strength.
        eval_crop_ratio: evaluation centre-crop ratio (DeiT-III: 1.0).
        optimizer: "lamb" or "adamw".
        lr: peak learning rate.
        weight_decay: weight decay (none for norms, biases, position embedding, [CLS], registers).
        warmup_epochs: linear warmup length in epochs (per step).
        min_lr_ratio: final learning rate over peak at the end of the cosine.
        betas: optimizer betas.
        eps: optimizer epsilon.
    """

    monitor = "val/top1"

    def __init__(
        self,
        backbone: RegisterViT,
        num_classes: int = 1000,
        image_size: int = 224,
        head_pool: str = "cls",
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.0,
        bce_loss: bool = True,
        crop: str = "src",
        color_jitter: float = 0.3,
        eval_crop_ratio: float = 1.0,
        optimizer: str = "lamb",
        lr: float = 3e-3,
        weight_decay: float = 0.02,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool must be one of {HEAD_POOLS}, got {head_pool!r}")
        self.save_objective_hparams(backbone)
        self.backbone = backbone
        features = backbone.embed_dim * (2 if head_pool == "cls+mean" else 1)
        self.head = nn.Linear(features, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.mixup = (
            Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if mixup_alpha > 0 or cutmix_alpha > 0
            else None
        )
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def make_transform(self, train: bool):
        hp = self.hparams
        if train:
            return ThreeAugment(hp.image_size, crop=hp.crop, color_jitter=hp.color_jitter)
        return EvalTransform(hp.image_size, crop_ratio=hp.eval_crop_ratio)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        features = self.backbone(images, return_features=True)
        pooled = features["x_norm_clstoken"]
        if self.hparams.head_pool == "cls+mean":
            pooled = torch.cat([pooled, features["x_norm_patchtokens"].mean(dim=1)], dim=-1)
        return self.head(pooled)

    def soft_targets(self, images: torch.Tensor, labels: torch.Tensor):
        """Mixed images and their soft targets (Mixup/CutMix and label smoothing)."""
        if self.mixup is not None:
            return self.mixup(images, labels)
        smoothing = self.hparams.label_smoothing
        n = self.hparams.num_classes
        targets = one_hot(
            labels, n, on_value=1.0 - smoothing + smoothing / n, off_value=smoothing / n
        )
        return images, targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.hparams.bce_loss:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, targets = self.soft_targets(batch["image"], batch["label"])
        loss = self.loss(self(images), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict, stage: str) -> None:
        logits = self(batch["image"])
        labels = batch["label"]
        self.top1(logits, labels)
        self.top5(logits, labels)
        n = len(labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=n)
        self.log(f"{stage}/top1", self.top1, prog_bar=True, batch_size=n)
        self.log(f"{stage}/top5", self.top5, batch_size=n)
