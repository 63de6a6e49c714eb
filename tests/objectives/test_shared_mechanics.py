"""Parameter groups, optimizers, schedules and the Slurm requeue shared by every objective."""

import math
import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from lightning_registers.models import RegisterViT
from lightning_registers.objectives.optim import (
    build_optimizer,
    global_batch_size,
    no_decay_names,
    param_groups,
    peak_lr,
    scaled_lr,
)
from lightning_registers.objectives.requeue import SlurmRequeue, hpc_checkpoint_path
from lightning_registers.objectives.schedules import warmup_cosine, warmup_cosine_lr


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = RegisterViT(
            "vit_tiny", img_size=16, patch_size=8, depth=1, layerscale_init=0.1
        )
        self.head = nn.Linear(192, 3)


def test_no_weight_decay_for_norms_biases_positions_cls_and_registers():
    model = WithHead()
    skip = no_decay_names(model)
    for name in [
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.register_tokens",
        "backbone.mask_token",
        "backbone.norm.weight",
        "backbone.blocks.0.norm1.bias",
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.blocks.0.ls1.gamma",
        "head.bias",
    ]:
        assert name in skip, name
    for name in [
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.patch_embed.proj.weight",
        "head.weight",
    ]:
        assert name not in skip, name
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_open_clip_rule_decays_position_embedding_and_exempts_token_vectors():
    """open_clip_train exempts p.ndim < 2 (and ln/bn/bias/logit_scale names) in its own layout:
    its class embedding is 1-d, its positional embedding 2-d."""
    skip = no_decay_names(WithHead(), "open_clip")
    for name in [
        "backbone.cls_token",
        "backbone.register_tokens",
        "backbone.norm.weight",
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.blocks.0.ls1.gamma",
        "head.bias",
    ]:
        assert name in skip, name  # fmt: skip
    for name in ["backbone.pos_embed", "backbone.patch_embed.proj.weight", "head.weight"]:
        assert name not in skip, name


def test_dinov2_rule_exempts_only_biases_norms_and_layerscale():
    """DINOv2's param groups: wd_multiplier 0 iff the name ends in .bias or holds norm/gamma."""
    model = WithHead()
    skip = no_decay_names(model, "dinov2")
    expected = {
        n for n in dict(model.named_parameters())
        if n.endswith(".bias") or ".norm" in n or n.endswith(".gamma")
    }  # fmt: skip
    assert skip == expected
    for name in [
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.register_tokens",
        "backbone.mask_token",
    ]:
        assert name not in skip, name  # fmt: skip
    with pytest.raises(ValueError, match="no_decay_rule"):
        no_decay_names(model, "timm")


@pytest.mark.parametrize(
    ("world_size", "sqrt_lr", "linear_lr"),
    # per-device batch 32: global 32, 64, 256; by hand: 4e-3 * sqrt(g / 1024), 1e-3 * g / 512
    [(1, 4e-3 * 0.1767766953, 6.25e-5), (2, 1e-3, 1.25e-4), (8, 2e-3, 5e-4)],
)
def test_lr_scaling_from_the_world_size_the_trainer_runs_with(world_size, sqrt_lr, linear_lr):
    trainer = SimpleNamespace(
        world_size=world_size, accumulate_grad_batches=1, datamodule=SimpleNamespace(batch_size=32)
    )
    assert global_batch_size(trainer) == 32 * world_size
    dino = {"lr": 4e-3, "lr_scaling": "sqrt", "lr_base_batch": 1024}
    deit = {"lr": 1e-3, "lr_scaling": "linear", "lr_base_batch": 512}
    assert peak_lr(dino, trainer) == pytest.approx(sqrt_lr, rel=1e-9)
    assert peak_lr(deit, trainer) == pytest.approx(linear_lr, rel=1e-9)
    assert peak_lr({"lr": 1e-3, "lr_scaling": None}, trainer) == 1e-3


def test_lr_scaling_counts_gradient_accumulation_and_refuses_unknown_rules():
    trainer = SimpleNamespace(
        world_size=2, accumulate_grad_batches=4, datamodule=SimpleNamespace(batch_size=64)
    )
    assert global_batch_size(trainer) == 512
    assert scaled_lr(1e-3, "linear", 512, 512) == 1e-3
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(1e-3, "cubic", 512, 512)
    with pytest.raises(ValueError, match="datamodule"):
        global_batch_size(SimpleNamespace(datamodule=None, world_size=1))


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_optimizers_build_and_step(name):
    model = WithHead()
    opt = build_optimizer(name, param_groups(model, 0.05), lr=1e-3)
    before = model.head.weight.detach().clone()
    model.head(torch.randn(2, 192)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.head.weight)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("sgdd", param_groups(model, 0.0), lr=1.0)


def test_warmup_cosine_closed_form():
    # start, end of warmup, middle of the cosine, end, after the end
    assert warmup_cosine(0, 110, 10, 0.0, 1.0, 0.1) == 0.0
    assert warmup_cosine(5, 110, 10, 0.0, 1.0, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(10, 110, 10, 0.0, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 110, 10, 0.0, 1.0, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(35, 110, 10, 0.0, 1.0, 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert warmup_cosine(110, 110, 10, 0.0, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 110, 10, 0.0, 1.0, 0.1) == pytest.approx(0.1)
    # A rising schedule (EMA momentum 0.992 -> 1.0) without warmup.
    assert warmup_cosine(50, 100, 0, 0.0, 0.992, 1.0) == pytest.approx(0.996)


def test_lr_scheduler_follows_the_schedule_per_step():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine_lr(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.0)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0) and lrs[4] == pytest.approx(2.0)
    assert lrs[12] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.0, abs=1e-12)


def test_requeue_checkpoints_are_numbered_after_the_newest(tmp_path):
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_9.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"):
        (tmp_path / name).touch()
    assert hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"


def test_requeue_callback_leaves_the_signal_alone_outside_slurm():
    callback = SlurmRequeue()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    callback.setup(trainer, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL and callback._signal is None
