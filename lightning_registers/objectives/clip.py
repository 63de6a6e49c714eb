"""CLIP-contrastive training (OpenCLIP) with RegisterViT as the image tower."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip import get_tokenizer
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip.transformer import TextTransformer
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import nn

from ..data import ClipTransform
from ..models import RegisterViT
from .base import ObjectiveModule
from .optim import NO_DECAY_RULES, check_choice
from .safe_load import read_checkpoint

LOSSES = ("clip", "siglip")
ZEROSHOT_TEMPLATES = {"simple": SIMPLE_IMAGENET_TEMPLATES, "openai": OPENAI_IMAGENET_TEMPLATES}
"""Prompt templates of zero-shot classification: open_clip's 7 simple ones, or the 80 of
OpenAI's ImageNet evaluation that open_clip_train uses."""


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Image→text and text→image recall@k for paired, L2-normalized features (pair i ↔ i),
    computed in float32 (features may come from a bf16 forward)."""
    sims = image.float() @ text.float().T
    target = torch.arange(len(image), device=image.device)
    out = {}
    for direction, scores in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranks = scores.argsort(dim=1, descending=True)
        for k in ks:
            hit = (ranks[:, :k] == target[:, None]).any(dim=1).float().mean().item()
            out[f"{direction}_r{k}"] = hit
    return out


def zeroshot_accuracy(
    images: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor
) -> float:
    """Top-1 of normalized image features against a (dim, classes) zero-shot classifier, over
    the samples with a label (label >= 0), computed in float32 (the image features come from
    the validation forward, bf16 under mixed precision; the classifier from a float32 one)."""
    known = labels >= 0
    predicted = (images[known].float() @ classifier.float()).argmax(dim=-1)
    return (predicted == labels[known]).float().mean().item()


class ClipModule(ObjectiveModule):
    """RegisterViT image tower with a linear projection, open_clip's text tower, tokenizer and
    contrastive loss; validation by zero-shot classification and retrieval recall.

    Args:
        backbone: the register ViT image tower.
        num_classes: classes of the validation labels (linked from the data).
        image_size: image side (linked from the data).
        embed_dim: joint embedding width.
        text_width / text_layers / text_heads: open_clip TextTransformer size.
        context_length: text tokens per caption.
        vocab_size: tokenizer vocabulary size.
        tokenizer: open_clip tokenizer name.
        loss: "clip" (ClipLoss) or "siglip" (SigLipLoss).
        local_loss: ClipLoss over local features against gathered ones (less memory).
        gather_with_grad: gather features across ranks with gradients.
        init_logit_scale: initial log logit scale (log 1/0.07); clamped at log 100.
        text_checkpoint: optional path of an open_clip checkpoint whose ``transformer``,
            ``token_embedding``, ``positional_embedding``, ``ln_final`` and
            ``text_projection`` initialize the text tower.
        optimizer / lr / weight_decay / warmup_epochs / min_lr_ratio / betas / eps: AdamW
            (betas 0.9/0.98, eps 1e-6 as OpenCLIP) with warmup then cosine.
        no_decay_rule: which parameters take no weight decay (``optim.NO_DECAY_RULES``): by
            default norms, biases, logit scale, embeddings and registers; "open_clip" as
            open_clip_train (token and position embeddings decay).
        zeroshot_templates: prompts of the zero-shot classifier, "simple" or "openai" (the 80
            templates open_clip_train evaluates ImageNet with).
        compile: compile each transformer block with ``torch.compile`` (regional
            compilation, ``models.regional_compile``); checkpoints are the same.
    """

    monitor = "val/zeroshot_top1"
    image_mean = OPENAI_DATASET_MEAN
    image_std = OPENAI_DATASET_STD

    def __init__(
        self,
        backbone: RegisterViT,
        num_classes: int = 1000,
        image_size: int = 224,
        embed_dim: int = 512,
        text_width: int = 512,
        text_layers: int = 12,
        text_heads: int = 8,
        context_length: int = 77,
        vocab_size: int = 49408,
        tokenizer: str = "ViT-B-16",
        loss: str = "clip",
        local_loss: bool = True,
        gather_with_grad: bool = True,
        init_logit_scale: float = math.log(1 / 0.07),
        text_checkpoint: str | None = None,
        optimizer: str = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        no_decay_rule: str = "tokens",
        zeroshot_templates: str = "simple",
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_choice("loss", loss, LOSSES)
        check_choice("no_decay_rule", no_decay_rule, NO_DECAY_RULES)
        check_choice("zeroshot_templates", zeroshot_templates, tuple(ZEROSHOT_TEMPLATES))
        self.save_objective_hparams(backbone)
        self.backbone = backbone
        self.image_projection = nn.Linear(backbone.embed_dim, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=backbone.embed_dim**-0.5)
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=text_width,
            heads=text_heads,
            layers=text_layers,
            output_dim=embed_dim,
        )
        if text_checkpoint:
            self.load_text_tower(text_checkpoint)
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None
        self.criterion = None
        self.zeroshot_weights = None
        self.val_image_features, self.val_text_features, self.val_labels = [], [], []

    def load_text_tower(self, path: str) -> None:
        """Initialize the text tower from an open_clip checkpoint file (strict)."""
        checkpoint = read_checkpoint(path)
        state = checkpoint.get("state_dict", checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        own = self.text.state_dict()
        picked = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(picked) - {"attn_mask"})
        if missing:
            raise KeyError(f"text checkpoint {path} lacks text-tower keys: {', '.join(missing)}")
        self.text.load_state_dict(picked, strict=False)

    def no_weight_decay(self) -> set[str]:
        return {"text.token_embedding.weight"}

    def tower_blocks(self) -> list[nn.Module]:
        """The image tower's blocks and open_clip's text-tower blocks."""
        return [*super().tower_blocks(), *self.text.transformer.resblocks]

    def make_transform(self, train: bool):
        hp = self.hparams
        return ClipTransform(
            hp.image_size, train=train, tokenizer=hp.tokenizer, context_length=hp.context_length
        )

    def setup(self, stage: str) -> None:
        self.configure_criterion(self.trainer.global_rank, self.trainer.world_size)

    def configure_criterion(self, rank: int = 0, world_size: int = 1) -> None:
        """open_clip's loss for this rank; it gathers features across ``world_size`` ranks."""
        if self.hparams.loss == "siglip":
            self.criterion = SigLipLoss(rank=rank, world_size=world_size)
        else:
            self.criterion = ClipLoss(
                local_loss=self.hparams.local_loss,
                gather_with_grad=self.hparams.gather_with_grad,
                rank=rank,
                world_size=world_size,
            )

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_projection(self.backbone(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(texts)
        return F.normalize(features, dim=-1) if normalize else features

    def contrastive_loss(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(texts, normalize=True)
        extra = [self.logit_bias] if self.logit_bias is not None else []
        return self.criterion(image_features, text_features, self.logit_scale.exp(), *extra)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.contrastive_loss(batch["image"], batch["text"])
        n = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", self.logit_scale.exp().detach(), batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_image_features, self.val_text_features, self.val_labels = [], [], []
        names = self.trainer.datamodule.class_names if self.trainer.datamodule else None
        self.zeroshot_weights = self.zeroshot_classifier(names) if names else None

    def zeroshot_classifier(self, class_names: list[str]) -> torch.Tensor:
        """(embed_dim, classes): per class, the normalized mean of the normalized text features
        of its prompts (``zeroshot_templates``), built by open_clip."""
        hp = self.hparams
        tokenizer = get_tokenizer(hp.tokenizer, context_length=hp.context_length)
        templates = ZEROSHOT_TEMPLATES[hp.zeroshot_templates]
        return build_zero_shot_classifier(
            self, tokenizer, class_names, templates, device=self.device
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_image_features.append(self.encode_image(batch["image"], normalize=True))
        self.val_text_features.append(self.encode_text(batch["text"], normalize=True))
        self.val_labels.append(batch["label"])
        self.log(
            "val/loss",
            self.contrastive_loss(batch["image"], batch["text"]),
            sync_dist=True,
            batch_size=len(batch["image"]),
        )

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.val_image_features:
            return
        images = self.gather_all(torch.cat(self.val_image_features))
        texts = self.gather_all(torch.cat(self.val_text_features))
        labels = self.gather_all(torch.cat(self.val_labels))
        for name, value in retrieval_recall(images, texts).items():
            self.log(f"val/{name}", value)
        if self.zeroshot_weights is not None and (labels >= 0).any():
            top1 = zeroshot_accuracy(images, self.zeroshot_weights, labels)
            self.log("val/zeroshot_top1", top1, prog_bar=True)
