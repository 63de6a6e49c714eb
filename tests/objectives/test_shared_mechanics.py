"""Parameter groups, optimizers, schedules and the Slurm requeue shared by every objective."""

import math
import signal

import lightning as L
import pytest
import torch
from torch import nn

from lightning_registers.models import RegisterViT
from lightning_registers.objectives.optim import build_optimizer, no_decay_names, param_groups
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
