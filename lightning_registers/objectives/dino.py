"""Self-distillation with DINOv2's recipe (Oquab et al., 2024): DINO on [CLS] over global and
local crops, iBOT on masked patches, KoLeo, an EMA teacher with the same registers."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..data import EvalTransform, MultiCropTransform
from ..models import RegisterViT
from .base import ObjectiveModule
from .dino_head import DINOHead
from .dino_losses import (
    SoftmaxCenter,
    all_reduce_sum,
    dino_loss,
    ema_update,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from .knn import knn_accuracy, linear_probe_accuracy
from .optim import (
    LR_SCALINGS,
    NO_DECAY_RULES,
    build_optimizer,
    check_choice,
    no_decay_names,
    peak_lr,
)
from .schedules import run_length, warmup_cosine

CENTERINGS = ("sinkhorn_knopp", "softmax")


class DinoModule(ObjectiveModule):
    """Student and EMA teacher RegisterViT with DINO and iBOT heads, trained by DINOv2's losses
    and schedules; validation by weighted k-NN and a linear probe on teacher [CLS] features
    against training-shard features.

    Args:
        backbone: the student register ViT (its ``drop_path_rate`` applies to the student only;
            the teacher is the same architecture without stochastic depth).
        num_classes: classes of the labels used by k-NN and the linear probe (linked from data).
        image_size: global crop side (linked from the data).
        local_crop_size / num_local_crops / global_crop_scale / local_crop_scale: multi-crop.
        mask_probability / mask_ratio: iBOT masking of the global crops.
        stratified_masks: masks drawn per batch as DINOv2's collate (exactly
            ``mask_probability`` of the global crops masked, ratios spread over the range).
        blur_probabilities: blur chance of the first and second global crop and of the local
            crops (DINOv2 runs 0.0, 0.9, 0.5; see ``MultiCropTransform``).
        n_prototypes / head_hidden_dim / head_bottleneck_dim / head_layers: DINO head.
        prototype_init: initial prototypes, "trunc_normal" or "linear" (DINOv2).
        ibot_separate_head: a separate iBOT head (else the DINO head is shared).
        ibot_n_prototypes / ibot_bottleneck_dim: prototypes and bottleneck width of a separate
            iBOT head (default ``n_prototypes`` and ``head_bottleneck_dim``).
        dino_loss_weight / ibot_loss_weight / koleo_loss_weight: loss weights.
        centering: teacher targets by "sinkhorn_knopp" or "softmax" with an EMA center.
        center_momentum: EMA momentum of the softmax center.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        student_temp: student temperature.
        warmup_teacher_temp / teacher_temp / warmup_teacher_temp_epochs: teacher temperature,
            linear from the first to the second over the warmup epochs, then constant.
        momentum_teacher / final_momentum_teacher: EMA momentum, cosine from first to second
            over training.
        lr / min_lr / warmup_epochs: AdamW learning rate, linear warmup then cosine to min_lr.
        lr_scaling / lr_base_batch: None (``lr`` as given), or "sqrt"/"linear": ``lr`` is the
            rate for a global batch of ``lr_base_batch`` and is scaled to the run's global batch
            (DINOv2: "sqrt" from 1024, its ``sqrt_wrt_1024``).
        weight_decay / weight_decay_end: cosine weight-decay schedule.
        no_decay_rule: which parameters take no weight decay (``optim.NO_DECAY_RULES``; DINOv2:
            "dinov2", only biases, norms and LayerScale).
        layerwise_decay: learning-rate factor per block from the top (1 disables it).
        patch_embed_lr_mult: extra learning-rate factor of the patch embedding.
        freeze_last_layer_epochs: epochs with the heads' prototype layers frozen.
        clip_grad_per_part: clip the gradient norm of backbone and each head separately to the
            trainer's ``gradient_clip_val`` (DINOv2), instead of one global norm.
        betas / eps: AdamW.
        knn_k / knn_temperature: k-NN evaluation.
        knn_train_samples: training-shard samples (over all ranks) that k-NN and the probe fit.
        linear_probe_steps: full-batch steps of the linear probe (0 skips it).
        compile: compile each transformer block with ``torch.compile`` (regional
            compilation, ``models.regional_compile``); checkpoints are the same.
        photometric_on_device: the data workers only decode, crop and flip; colour jitter,
            grayscale, blur, solarization and normalization run batched on the training device
            with the same distributions (``MultiCropTransform``).
    """

    monitor = "val/knn_top1"
    uses_mask_token = True

    def __init__(
        self,
        backbone: RegisterViT,
        num_classes: int = 1000,
        image_size: int = 224,
        local_crop_size: int = 96,
        num_local_crops: int = 8,
        global_crop_scale: tuple[float, float] = (0.32, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.32),
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        stratified_masks: bool = False,
        blur_probabilities: tuple[float, float, float] = (1.0, 0.1, 0.5),
        n_prototypes: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        prototype_init: str = "trunc_normal",
        ibot_separate_head: bool = False,
        ibot_n_prototypes: int | None = None,
        ibot_bottleneck_dim: int | None = None,
        dino_loss_weight: float = 1.0,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        centering: str = "sinkhorn_knopp",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: float = 30.0,
        momentum_teacher: float = 0.992,
        final_momentum_teacher: float = 1.0,
        lr: float = 4e-3,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10.0,
        lr_scaling: str | None = None,
        lr_base_batch: int = 1024,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.2,
        no_decay_rule: str = "tokens",
        layerwise_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        freeze_last_layer_epochs: float = 1.0,
        clip_grad_per_part: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        knn_train_samples: int = 10000,
        linear_probe_steps: int = 300,
        compile: bool = False,
        photometric_on_device: bool = False,
    ) -> None:
        super().__init__()
        check_choice("centering", centering, CENTERINGS)
        check_choice("no_decay_rule", no_decay_rule, NO_DECAY_RULES)
        check_choice("lr_scaling", lr_scaling, (None, *LR_SCALINGS))
        self.save_objective_hparams(backbone)
        self.backbone = backbone
        head = dict(hidden_dim=head_hidden_dim, n_layers=head_layers, prototype_init=prototype_init)
        dino = dict(head, n_prototypes=n_prototypes, bottleneck_dim=head_bottleneck_dim)
        ibot = dict(
            head,
            n_prototypes=ibot_n_prototypes or n_prototypes,
            bottleneck_dim=ibot_bottleneck_dim or head_bottleneck_dim,
        )
        self.dino_head = DINOHead(backbone.embed_dim, **dino)
        self.ibot_head = DINOHead(backbone.embed_dim, **ibot) if ibot_separate_head else None
        teacher_backbone = RegisterViT.from_config(backbone.config.replace(drop_path_rate=0.0))
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone})
        self.teacher["dino_head"] = DINOHead(backbone.embed_dim, **dino)
        if self.ibot_head is not None:
            self.teacher["ibot_head"] = DINOHead(backbone.embed_dim, **ibot)
        self.teacher.load_state_dict(self.student_state())
        self.teacher.requires_grad_(False)
        if centering == "softmax":
            self.dino_center = SoftmaxCenter(n_prototypes, center_momentum)
            self.ibot_center = SoftmaxCenter(ibot["n_prototypes"], center_momentum)
        self.val_features: list[torch.Tensor] = []
        self.val_labels: list[torch.Tensor] = []
        self.bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.teacher_step = 0
        self.peak_lr = lr
        """The peak learning rate, ``lr`` after ``lr_scaling`` (set when the optimizer is made)."""

    def student_modules(self) -> dict[str, nn.Module]:
        """The student's parts under the teacher's names."""
        modules = {"backbone": self.backbone, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            modules["ibot_head"] = self.ibot_head
        return modules

    def student_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value
            for name, module in self.student_modules().items()
            for key, value in module.state_dict().items()
        }

    def monitored_backbones(self) -> dict[str, RegisterViT]:
        return {"student": self.backbone, "teacher": self.teacher["backbone"]}

    def make_transform(self, train: bool):
        hp = self.hparams
        if not train:
            return EvalTransform(hp.image_size)
        return MultiCropTransform(
            hp.image_size,
            hp.local_crop_size,
            num_local_crops=hp.num_local_crops,
            global_scale=tuple(hp.global_crop_scale),
            local_scale=tuple(hp.local_crop_scale),
            patch_size=self.backbone.patch_size,
            mask_probability=hp.mask_probability,
            mask_ratio=tuple(hp.mask_ratio),
            blur_probabilities=tuple(hp.blur_probabilities),
            stratified_masks=hp.stratified_masks,
            photometric_on_device=hp.photometric_on_device,
        )

    # --- schedules -------------------------------------------------------------------------

    def schedule(self, step: int, total: int, steps_per_epoch: float) -> dict[str, float]:
        """Learning rate, weight decay, teacher temperature, EMA momentum and the prototype
        layers' learning-rate factor at optimizer step ``step`` of ``total``."""
        hp = self.hparams
        warmup = min(int(hp.warmup_epochs * steps_per_epoch), max(total - 1, 0))
        temp_warmup = int(hp.warmup_teacher_temp_epochs * steps_per_epoch)
        t0, t1 = hp.warmup_teacher_temp, hp.teacher_temp
        m0, m1 = hp.momentum_teacher, hp.final_momentum_teacher
        return {
            "lr": warmup_cosine(step, total, warmup, 0.0, self.peak_lr, hp.min_lr),
            "weight_decay": warmup_cosine(
                step, total, 0, hp.weight_decay, hp.weight_decay, hp.weight_decay_end
            ),
            "teacher_temp": warmup_cosine(step, temp_warmup, temp_warmup, t0, t1, t1),
            "momentum": warmup_cosine(step, total, 0, m0, m0, m1),
            "last_layer_lr": float(step >= hp.freeze_last_layer_epochs * steps_per_epoch),
        }

    def current_schedule(self) -> dict[str, float]:
        return self.schedule(self.trainer.global_step, *run_length(self.trainer))

    # --- optimization ----------------------------------------------------------------------

    def lr_scale(self, name: str) -> float:
        """Layer-wise decay as DINOv2: embeddings count as layer 0, block i as layer i + 1, the
        rest (final norm, heads) as the top; the patch embedding gets a further factor."""
        hp = self.hparams
        top = self.backbone.depth + 1
        inner = name.removeprefix("backbone.")
        layer = self.backbone.layer_of(inner) if inner != name else top
        scale = hp.layerwise_decay ** (top - layer)
        if name.startswith("backbone.patch_embed"):
            scale *= hp.patch_embed_lr_mult
        return scale

    def configure_optimizers(self):
        self.peak_lr = peak_lr(self.hparams, self._trainer)
        skip = no_decay_names(self, self.hparams.no_decay_rule)
        groups: dict[tuple, dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            key = (
                self.lr_scale(name),
                0.0 if name in skip else 1.0,
                ".last_layer." in name,
            )
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "lr_scale": key[0],
                    "weight_decay_scale": key[1],
                    "is_last_layer": key[2],
                    "weight_decay": self.hparams.weight_decay * key[1],
                },
            )
            group["params"].append(param)
        hp = self.hparams
        return build_optimizer("adamw", groups.values(), hp.lr, tuple(hp.betas), hp.eps)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """With ``clip_grad_per_part``, each student part (backbone, DINO head, iBOT head) to
        norm ``gradient_clip_val`` on its own, as DINOv2; else Lightning's global clipping."""
        if not (self.hparams.clip_grad_per_part and gradient_clip_val):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError("clip_grad_per_part clips norms: use gradient_clip_algorithm=norm")
        for module in self.student_modules().values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), gradient_clip_val)

    def on_train_start(self) -> None:
        self.teacher_step = self.trainer.global_step

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        values = self.current_schedule()
        for group in self.trainer.optimizers[0].param_groups:
            factor = values["last_layer_lr"] if group["is_last_layer"] else 1.0
            group["lr"] = values["lr"] * group["lr_scale"] * factor
            group["weight_decay"] = values["weight_decay"] * group["weight_decay_scale"]
        for key in ("lr", "weight_decay", "teacher_temp", "momentum"):
            self.log(f"train/{key}", values[key], batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        step = self.trainer.global_step
        if step == self.teacher_step:
            return  # accumulating gradients: no optimizer step in this batch
        self.teacher_step = step
        # The optimizer step just taken was step - 1.
        self.update_teacher(self.schedule(step - 1, *run_length(self.trainer))["momentum"])

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher, parameter by parameter (shard by shard)."""
        for module in self.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # an FSDP2 root keeps its gathered parameters after forward
        student, teacher = [], []
        for name, module in self.student_modules().items():
            student += list(module.parameters())
            teacher += list(self.teacher[name].parameters())
        ema_update(teacher, student, momentum)

    # --- losses ----------------------------------------------------------------------------

    def teacher_targets(self, logits: torch.Tensor, temp: float, center: str, n=None):
        if self.hparams.centering == "softmax":
            return getattr(self, center)(logits, temp)
        return sinkhorn_knopp(logits, temp, self.hparams.sinkhorn_iterations, n)

    def losses(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        """DINO, iBOT and KoLeo terms and their weighted sum for a multi-crop batch."""
        hp = self.hparams
        n_global = batch["global_crops"].shape[1]
        global_crops = batch["global_crops"].transpose(0, 1).flatten(0, 1)  # crop-major
        masks = batch["masks"].transpose(0, 1).flatten(0, 1)
        ibot_student_head = self.ibot_head or self.dino_head
        with torch.no_grad():
            out = self.teacher["backbone"](global_crops, return_features=True)
            teacher_ibot_head = (
                self.teacher["ibot_head"] if self.ibot_head else self.teacher["dino_head"]
            )
            t_dino = self.teacher["dino_head"](out["x_norm_clstoken"])
            t_ibot = teacher_ibot_head(out["x_norm_patchtokens"][masks])
            n_masked = all_reduce_sum(masks.sum().float())
            t_dino = self.teacher_targets(t_dino, teacher_temp, "dino_center")
            t_ibot = self.teacher_targets(t_ibot, teacher_temp, "ibot_center", n_masked)

        out = self.backbone(global_crops, masks, return_features=True)
        student = list(self.dino_head(out["x_norm_clstoken"]).chunk(n_global))
        if batch["local_crops"].numel():
            local = batch["local_crops"].transpose(0, 1).flatten(0, 1)
            student += self.dino_head(self.backbone(local)).chunk(batch["local_crops"].shape[1])
        s_ibot = ibot_student_head(out["x_norm_patchtokens"][masks])
        terms = {
            "dino": dino_loss(student, t_dino.chunk(n_global), hp.student_temp),
            "ibot": ibot_loss(s_ibot, t_ibot, masks, hp.student_temp),
            "koleo": sum(koleo_loss(c) for c in out["x_norm_clstoken"].chunk(n_global)),
        }
        terms["loss"] = (
            hp.dino_loss_weight * terms["dino"]
            + hp.ibot_loss_weight * terms["ibot"]
            + hp.koleo_loss_weight * terms["koleo"]
        )
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        masks, hp = batch["masks"], self.hparams
        if (
            hp.stratified_masks
            and int(masks[:, :, 0].numel() * hp.mask_probability)
            and (not masks.any())
        ):
            raise RuntimeError(
                "stratified_masks: the batch has no iBOT mask; batches must be made by the "
                "transform's collate (ShardDataModule does this)"
            )
        terms = self.losses(batch, self.current_schedule()["teacher_temp"])
        n = len(batch["global_crops"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=n)
        return terms["loss"]

    # --- validation: k-NN and linear probe on teacher [CLS] ---------------------------------

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher["backbone"](images)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_features, self.val_labels, self.bank = [], [], None
        datamodule = self.trainer.datamodule
        if self.trainer.sanity_checking or not hasattr(datamodule, "train_eval_dataloader"):
            return
        per_rank = -(-self.hparams.knn_train_samples // self.trainer.world_size)
        loader = datamodule.train_eval_dataloader(self.make_transform(train=False))
        features, labels, seen = [], [], 0
        for batch in loader:
            features.append(self.teacher_features(batch["image"].to(self.device)))
            labels.append(batch["label"].to(self.device))
            seen += len(labels[-1])
            if seen >= per_rank:
                break
        features = torch.cat(features)[:per_rank]
        labels = torch.cat(labels)[:per_rank]
        self.bank = (self.gather_all(features), self.gather_all(labels))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_features.append(self.teacher_features(batch["image"]))
        self.val_labels.append(batch["label"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.bank is None or not self.val_features:
            return
        features = self.gather_all(torch.cat(self.val_features))
        labels = self.gather_all(torch.cat(self.val_labels))
        bank_features, bank_labels = self.bank
        known, bank_known = labels >= 0, bank_labels >= 0
        if not known.any() or not bank_known.any():
            return
        hp = self.hparams
        args = (bank_features[bank_known], bank_labels[bank_known], features[known], labels[known])
        knn = knn_accuracy(*args, hp.num_classes, hp.knn_k, hp.knn_temperature)
        self.log("val/knn_top1", knn, prog_bar=True)
        if hp.linear_probe_steps:
            probe = linear_probe_accuracy(*args, hp.num_classes, hp.linear_probe_steps)
            self.log("val/linear_top1", probe)
