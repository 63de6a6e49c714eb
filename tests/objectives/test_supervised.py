"""SupervisedModule: targets, pooling, losses, and learning on the demo scenes."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from demo_run import demo_datamodule, quiet_trainer

from lightning_registers.models import RegisterViT
from lightning_registers.objectives import SupervisedModule


def module(**kwargs) -> SupervisedModule:
    backbone = RegisterViT(
        "vit_tiny", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_registers=4
    )
    args = dict(num_classes=4, image_size=32, mixup_alpha=0.0, cutmix_alpha=0.0)
    args.update(kwargs)
    return SupervisedModule(backbone, **args)


def test_label_smoothing_targets_by_hand():
    m = module(label_smoothing=0.2)
    _, targets = m.soft_targets(torch.zeros(2, 3, 32, 32), torch.tensor([1, 3]))
    expected = torch.tensor([[0.05, 0.85, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]])
    torch.testing.assert_close(targets, expected)


def test_mixup_cutmix_targets_are_distributions_and_bce_matches_torch():
    torch.manual_seed(0)
    m = module(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, targets = m.soft_targets(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    logits = torch.randn(4, 4)
    expected = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(m.loss(logits, targets), expected)


def test_soft_target_cross_entropy_equals_torch_with_hard_labels():
    m = module(bce_loss=False)
    logits, labels = torch.randn(3, 4), torch.tensor([0, 2, 3])
    _, targets = m.soft_targets(torch.zeros(3, 3, 32, 32), labels)
    torch.testing.assert_close(m.loss(logits, targets), F.cross_entropy(logits, labels))


def test_cls_plus_mean_pooling_feeds_both_to_the_head():
    m = module(head_pool="cls+mean").eval()
    assert m.head.in_features == 128
    x = torch.randn(2, 3, 32, 32)
    f = m.backbone.forward_features(x)
    pooled = torch.cat([f["x_norm_clstoken"], f["x_norm_patchtokens"].mean(1)], -1)
    torch.testing.assert_close(m(x), m.head(pooled))
    with pytest.raises(ValueError, match="head_pool"):
        module(head_pool="gap")


def test_short_training_on_demo_scenes_is_well_above_chance(demo_shards):
    L.seed_everything(0)
    m = SupervisedModule(
        RegisterViT("vit_tiny", img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3),
        num_classes=10,
        image_size=32,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        bce_loss=False,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.05,
        warmup_epochs=0.2,
        crop="src",
    )
    dm = demo_datamodule(
        demo_shards,
        batch_size=32,
        num_workers=0,
        samples_per_epoch=3200,
        image_size=32,
        num_classes=10,
    )
    trainer = quiet_trainer(
        max_epochs=4,
    )
    trainer.fit(m, dm)
    top1 = trainer.callback_metrics["val/top1"].item()
    assert top1 > 0.3, f"validation top-1 {top1:.3f} is not well above chance (0.10)"


def test_binarized_bce_targets_are_the_classes_present_after_mixing():
    """DeiT's --bce-loss: BCE against targets.gt(0) of the mixed targets."""
    m = module(bce_binarize=True)
    targets = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 1.0, -2.0, 3.0]])
    binary = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    expected = -(binary * F.logsigmoid(logits) + (1 - binary) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(m.loss(logits, targets), expected)
    soft = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(module().loss(logits, targets), soft)
    with pytest.raises(ValueError, match="label_smoothing"):
        module(bce_binarize=True, label_smoothing=0.1)


def test_model_ema_follows_each_optimizer_step_and_is_validated_on_its_own(demo_shards):
    L.seed_everything(0)
    decay = 0.5
    m = SupervisedModule(
        RegisterViT("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        num_classes=10,
        image_size=32,
        optimizer="adamw",
        lr=1e-2,
        model_ema_decay=decay,
    )
    assert not any(p.requires_grad for p in m.model_ema.parameters())
    start = {k: v.clone() for k, v in m.classifier().state_dict().items()}
    seen = []

    class Track(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: v.clone() for k, v in pl_module.classifier().state_dict().items()})

    dm = demo_datamodule(
        demo_shards,
        batch_size=8,
        num_workers=0,
        samples_per_epoch=24,
        val_batch_size=16,
        image_size=32,
        num_classes=10,
    )
    trainer = quiet_trainer(
        max_epochs=1,
        callbacks=[Track()],
        limit_val_batches=2,
    )
    trainer.fit(m, dm)
    # Three steps of ema = decay * ema + (1 - decay) * model, from the initial weights.
    key = "backbone.blocks.0.mlp.fc1.weight"
    expected = start[key]
    for weights in seen:
        expected = decay * expected + (1 - decay) * weights[key]
    torch.testing.assert_close(m.model_ema.module.state_dict()[key], expected)
    metrics = trainer.callback_metrics
    assert {"val/top1", "val/ema_top1", "val/ema_top5", "val/ema_loss"} <= set(metrics)
    assert metrics["val/ema_loss"] != metrics["val/loss"]


def test_learning_rate_scaling_and_decay_rule_reach_the_optimizer(demo_shards):
    """lr x global batch / 512 at the world size of the run (1 here, batches of 8); the decay
    rule picks the groups."""
    m = module(num_classes=10, lr=1e-3, lr_scaling="linear", no_decay_rule="dinov2")
    dm = demo_datamodule(
        demo_shards,
        batch_size=8,
        num_workers=0,
        samples_per_epoch=8,
        image_size=32,
        num_classes=10,
    )
    trainer = quiet_trainer(
        max_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(m, dm)
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["initial_lr"] == pytest.approx(1e-3 * 8 / 512)
    decayed = {id(p) for p in decay["params"]}
    assert id(m.backbone.pos_embed) in decayed and id(m.backbone.cls_token) in decayed
    assert id(m.backbone.norm.weight) not in decayed
