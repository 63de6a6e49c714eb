"""Supervised classification with the DeiT-III recipe (Touvron, Cord, Jégou, 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import one_hot
from timm.layers import trunc_normal_
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..data import EvalTransform, ThreeAugment
from ..models import RegisterViT
from .base import ObjectiveModule
from .optim import LR_SCALINGS, NO_DECAY_RULES, check_choice

HEAD_POOLS = ("cls", "cls+mean")


class SupervisedModule(ObjectiveModule):
    """RegisterViT and a linear head trained with DeiT-III's recipe: 3-Augment, Mixup/CutMix
    (timm), binary or soft-target cross-entropy, LAMB, warmup then cosine, and optionally an
    EMA of the model validated beside it (``val/ema_top1``, ``val/ema_top5``, ``val/ema_loss``).

    Args:
        backbone: the register ViT (its drop_path_rate and layerscale_init are part of the
            recipe: DeiT-III ViT-B uses 0.1 in every block and 1e-4).
        num_classes: classifier outputs (linked from the data).
        image_size: training and evaluation image side (linked from the data).
        head_pool: features for the head: "cls", or "cls+mean" ([CLS] and mean patch token).
        mixup_alpha: Mixup alpha (0 turns Mixup off).
        cutmix_alpha: CutMix alpha (0 turns CutMix off).
        label_smoothing: label smoothing of the targets.
        bce_loss: binary cross-entropy on the (mixed) targets (DeiT-III's ``--bce-loss``); else
            soft-target cross-entropy.
        bce_binarize: BCE on the mixed targets made 0/1 (``targets > 0``), as DeiT's
            ``--bce-loss`` does (needs ``label_smoothing=0``, else every target is 1).
        crop: training crop of 3-Augment, "src" (simple random crop) or "rrc".
        color_jitter: 3-Augment's colour-jitter strength.
        blur: 3-Augment's blur, "kernel5" (torchvision, 5 px kernel) or "pil" (PIL's
            GaussianBlur with a radius of 0.1-2 px, as DeiT-III).
        eval_crop_ratio: evaluation centre-crop ratio (DeiT-III: 1.0).
        optimizer: "lamb" or "adamw".
        lr: peak learning rate.
        weight_decay: weight decay (none for norms, biases, position embedding, [CLS], registers
            under the default ``no_decay_rule``).
        no_decay_rule: which parameters take no weight decay (``optim.NO_DECAY_RULES``).
        warmup_epochs: linear warmup length in epochs (per step).
        min_lr_ratio: final learning rate over peak at the end of the cosine.
        betas: optimizer betas.
        eps: optimizer epsilon.
        lr_scaling: None (``lr`` as given), "linear" or "sqrt": ``lr`` is the rate for a global
            batch of ``lr_base_batch`` and is scaled to the global batch of the run (per-device
            batch x world size x accumulation), as DeiT without ``--unscale-lr``.
        lr_base_batch: the global batch ``lr`` is given for (DeiT: 512).
        model_ema_decay: keep an EMA of backbone and head with this decay, updated after every
            optimizer step (DeiT: 0.99996); None keeps none.
        compile: compile each transformer block with ``torch.compile`` (regional
            compilation, ``models.regional_compile``); checkpoints are the same.
        photometric_on_device: the data workers only decode, crop and flip; 3-Augment's
            grayscale / solarization / blur, colour jitter and normalization run batched on the
            training device with the same distributions (``ThreeAugment``).
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
        bce_binarize: bool = False,
        crop: str = "src",
        color_jitter: float = 0.3,
        blur: str = "kernel5",
        eval_crop_ratio: float = 1.0,
        optimizer: str = "lamb",
        lr: float = 3e-3,
        weight_decay: float = 0.02,
        no_decay_rule: str = "tokens",
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_scaling: str | None = None,
        lr_base_batch: int = 512,
        model_ema_decay: float | None = None,
        compile: bool = False,
        photometric_on_device: bool = False,
    ) -> None:
        super().__init__()
        check_choice("head_pool", head_pool, HEAD_POOLS)
        check_choice("no_decay_rule", no_decay_rule, NO_DECAY_RULES)
        check_choice("lr_scaling", lr_scaling, (None, *LR_SCALINGS))
        if bce_binarize and label_smoothing > 0:
            raise ValueError("bce_binarize needs label_smoothing 0: smoothed targets are all > 0")
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
        self.top1, self.top5 = self._accuracies(num_classes)
        self.model_ema = None
        if model_ema_decay is not None:
            self.model_ema = ModelEmaV3(self.classifier(), decay=model_ema_decay)
            self.model_ema.requires_grad_(False)
            self.ema_top1, self.ema_top5 = self._accuracies(num_classes)
        self.ema_step = 0

    @staticmethod
    def _accuracies(num_classes: int) -> tuple[MulticlassAccuracy, MulticlassAccuracy]:
        top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        return top1, MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def classifier(self) -> nn.ModuleDict:
        """Backbone and head as one module (what the EMA averages)."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def make_transform(self, train: bool):
        hp = self.hparams
        if train:
            return ThreeAugment(
                hp.image_size,
                crop=hp.crop,
                color_jitter=hp.color_jitter,
                blur=hp.blur,
                photometric_on_device=hp.photometric_on_device,
            )
        return EvalTransform(hp.image_size, crop_ratio=hp.eval_crop_ratio)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.logits(self.backbone, self.head, images)

    def logits(self, backbone: RegisterViT, head: nn.Linear, images: torch.Tensor):
        """Class logits of ``backbone`` and ``head`` (the model's or the EMA's)."""
        features = backbone(images, return_features=True)
        pooled = features["x_norm_clstoken"]
        if self.hparams.head_pool == "cls+mean":
            pooled = torch.cat([pooled, features["x_norm_patchtokens"].mean(dim=1)], dim=-1)
        return head(pooled)

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
            if self.hparams.bce_binarize:
                targets = targets.gt(0.0).to(targets.dtype)
            return F.binary_cross_entropy_with_logits(logits, targets)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, targets = self.soft_targets(batch["image"], batch["label"])
        loss = self.loss(self(images), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        step = self.trainer.global_step
        if self.model_ema is not None and step != self.ema_step:  # an optimizer step was taken
            self.ema_step = step
            self.model_ema.update(self.classifier())

    def on_train_start(self) -> None:
        self.ema_step = self.trainer.global_step

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict, stage: str) -> None:
        self._log_accuracy(self(batch["image"]), batch["label"], stage, "", self.top1, self.top5)
        if self.model_ema is not None:
            ema = self.model_ema.module
            logits = self.logits(ema["backbone"], ema["head"], batch["image"])
            self._log_accuracy(logits, batch["label"], stage, "ema_", self.ema_top1, self.ema_top5)

    def _log_accuracy(self, logits, labels, stage: str, prefix: str, top1, top5) -> None:
        top1(logits, labels)
        top5(logits, labels)
        n = len(labels)
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}/{prefix}loss", loss, sync_dist=True, batch_size=n)
        self.log(f"{stage}/{prefix}top1", top1, prog_bar=not prefix, batch_size=n)
        self.log(f"{stage}/{prefix}top5", top5, batch_size=n)
