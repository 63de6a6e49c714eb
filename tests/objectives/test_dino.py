"""DINOv2 objective: losses against hand computations, Sinkhorn marginals, schedules, EMA."""

import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from demo_run import ROOT, demo_data, demo_datamodule, quiet_trainer, write_yaml
from ports import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.fsdp import fully_shard

from lightning_registers.cli import close_process_group
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import DinoModule
from lightning_registers.objectives.dino_losses import (
    SoftmaxCenter,
    dino_loss,
    ema_update,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from lightning_registers.objectives.knn import knn_accuracy, linear_probe_accuracy


def tiny_dino(**kwargs) -> DinoModule:
    torch.manual_seed(0)
    backbone = RegisterViT(
        "vit_tiny",
        img_size=32,
        patch_size=8,
        num_registers=2,
        embed_dim=32,
        depth=2,
        num_heads=2,
        drop_path_rate=0.1,
    )
    args = dict(
        num_classes=10,
        image_size=32,
        local_crop_size=16,
        num_local_crops=2,
        n_prototypes=64,
        head_hidden_dim=48,
        head_bottleneck_dim=16,
        knn_train_samples=100,
        linear_probe_steps=50,
    )
    return DinoModule(backbone, **{**args, **kwargs})


def multicrop_batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, 2, 16, generator=g) < 0.4
    masks[0, 0] = False  # an unmasked global crop
    return {
        "global_crops": torch.randn(b, 2, 3, 32, 32, generator=g),
        "local_crops": torch.randn(b, 2, 3, 16, 16, generator=g),
        "masks": masks,
        "label": torch.arange(b),
    }


def test_sinkhorn_knopp_uses_every_prototype_equally_and_rows_sum_to_one():
    logits = torch.randn(64, 16) * 3
    targets = sinkhorn_knopp(logits, temperature=0.5, iterations=200)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(targets.sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-3, atol=0)


def test_softmax_center_subtracts_then_updates_an_ema_of_the_batch_mean():
    center = SoftmaxCenter(3, momentum=0.9)
    center.center.fill_(0.5)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    targets = center(logits, temperature=0.5)
    torch.testing.assert_close(targets, F.softmax((logits - 0.5) / 0.5, dim=-1))
    torch.testing.assert_close(center.center, torch.full((1, 3), 0.9 * 0.5 + 0.1 * 2.0))


def _ce(target, logits, temp):
    z = [math.exp(v / temp) for v in logits]
    return -sum(t * math.log(e / sum(z)) for t, e in zip(target, z, strict=True))


def test_dino_loss_by_hand():
    s = [[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]]  # two global crops then one local, batch of 1
    t = [[0.7, 0.3], [0.2, 0.8]]
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1)]  # a global crop never meets its own teacher view
    expected = sum(_ce(t[j], s[i], 0.1) for i, j in pairs) / 4
    got = dino_loss([torch.tensor([x]) for x in s], [torch.tensor([x]) for x in t], 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_without_local_crops_divides_by_the_global_pairs_plus_one():
    """DINOv2 divides by global + max(local, 1) pairs: 2 + 1 for two global crops alone."""
    s = [[1.0, 0.0], [0.0, 2.0]]
    t = [[0.7, 0.3], [0.2, 0.8]]
    expected = (_ce(t[1], s[0], 0.1) + _ce(t[0], s[1], 0.1)) / 3
    got = dino_loss([torch.tensor([x]) for x in s], [torch.tensor([x]) for x in t], 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_by_hand():
    masks = torch.tensor([[True, False, True], [False, False, False]])
    s = [[1.0, -1.0], [0.0, 0.5]]
    t = [[0.9, 0.1], [0.4, 0.6]]
    # Image 0 averages its two masked patches; the unmasked image 1 counts as zero; mean of 2.
    expected = (_ce(t[0], s[0], 0.1) / 2 + _ce(t[1], s[1], 0.1) / 2) / 2
    got = ibot_loss(torch.tensor(s), torch.tensor(t), masks, 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_koleo_against_brute_force_nearest_neighbours():
    x = torch.randn(12, 5)
    unit = F.normalize(x, dim=-1)
    distances = torch.cdist(unit.double(), unit.double())
    distances.fill_diagonal_(float("inf"))
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    assert koleo_loss(x).item() == pytest.approx(expected.item(), rel=1e-4)


def test_ema_is_exactly_m_teacher_plus_one_minus_m_student():
    shapes = [(50, 30), (70,), (3, 4, 5)]
    teacher = [torch.randn(shape) for shape in shapes]
    student = [torch.randn(shape) for shape in shapes]
    m = 0.996
    expected = [m * t + (1 - m) * s for t, s in zip(teacher, student, strict=True)]
    ema_update(teacher, student, m)
    assert all(torch.equal(t, e) for t, e in zip(teacher, expected, strict=True))


def test_knn_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.8]])
    # k=3: test 0 -> two 0s and one 1 at 45 deg: class 0; test 2 -> the diagonal and two 1s.
    acc = knn_accuracy(train, labels, test, torch.tensor([0, 1, 0]), 2, k=3, temperature=0.1)
    assert acc == pytest.approx(2 / 3)


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=g)
    labels = (features[:, 0] > 0).long()
    assert (
        linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:], 2) > 0.9
    )


def test_schedules_at_start_middle_and_end():
    module = tiny_dino(
        lr=1e-3,
        min_lr=1e-5,
        warmup_epochs=2,
        weight_decay=0.04,
        weight_decay_end=0.2,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=4,
        momentum_teacher=0.992,
        final_momentum_teacher=1.0,
        freeze_last_layer_epochs=1,
    )
    total, per_epoch = 1000, 100.0  # 10 epochs of 100 steps
    start, middle = module.schedule(0, total, per_epoch), module.schedule(600, total, per_epoch)
    end = module.schedule(1000, total, per_epoch)
    assert start["lr"] == 0 and module.schedule(200, total, per_epoch)["lr"] == pytest.approx(1e-3)
    assert middle["lr"] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # half way through the cosine
    assert end["lr"] == pytest.approx(1e-5)
    assert start["weight_decay"] == pytest.approx(0.04)
    assert module.schedule(500, total, per_epoch)["weight_decay"] == pytest.approx(0.12)
    assert end["weight_decay"] == pytest.approx(0.2)
    assert start["teacher_temp"] == pytest.approx(0.04)
    assert module.schedule(200, total, per_epoch)["teacher_temp"] == pytest.approx(0.055)
    assert middle["teacher_temp"] == end["teacher_temp"] == pytest.approx(0.07)
    assert start["momentum"] == pytest.approx(0.992)
    assert module.schedule(500, total, per_epoch)["momentum"] == pytest.approx(0.996)
    assert end["momentum"] == pytest.approx(1.0)
    assert module.schedule(99, total, per_epoch)["last_layer_lr"] == 0
    assert module.schedule(100, total, per_epoch)["last_layer_lr"] == 1


def test_layerwise_learning_rate_decay_follows_dinov2():
    module = tiny_dino(layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    assert module.lr_scale("backbone.cls_token") == 0.5**3
    assert module.lr_scale("backbone.register_tokens") == 0.5**3
    assert module.lr_scale("backbone.patch_embed.proj.weight") == pytest.approx(0.2 * 0.5**3)
    assert module.lr_scale("backbone.blocks.0.attn.qkv.weight") == 0.5**2
    assert module.lr_scale("backbone.blocks.1.mlp.fc1.weight") == 0.5
    assert module.lr_scale("backbone.norm.weight") == 1 == module.lr_scale("dino_head.mlp.0.weight")


def test_per_part_clipping_clips_backbone_and_each_head_on_its_own():
    module = tiny_dino(ibot_separate_head=True, clip_grad_per_part=True)
    norms = {"backbone": 6.0, "dino_head": 1.0, "ibot_head": 12.0}
    before = {}
    for name, part in module.student_modules().items():
        params = [p for p in part.parameters() if p.requires_grad]
        grads = [torch.randn_like(p) for p in params]
        total = torch.cat([g.flatten() for g in grads]).norm()
        for p, g in zip(params, grads, strict=True):
            p.grad = g * norms[name] / total
        before[name] = [p.grad.clone() for p in params]
    module.configure_gradient_clipping(None, gradient_clip_val=3.0, gradient_clip_algorithm="norm")
    for name, part in module.student_modules().items():
        params = [p for p in part.parameters() if p.requires_grad]
        factor = min(1.0, 3.0 / (norms[name] + 1e-6))  # torch's clip_grad_norm_ coefficient
        for p, g in zip(params, before[name], strict=True):
            torch.testing.assert_close(p.grad, g * factor)
        norm = torch.cat([p.grad.flatten() for p in params]).norm().item()
        assert norm == pytest.approx(min(norms[name], 3.0), rel=1e-5)
    grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
    assert torch.cat(grads).norm().item() == pytest.approx(math.sqrt(9 + 1 + 9), rel=1e-5)


def test_heads_take_their_own_sizes_and_dinov2s_prototype_init():
    module = tiny_dino(
        ibot_separate_head=True,
        ibot_n_prototypes=32,
        ibot_bottleneck_dim=8,
        prototype_init="linear",
    )
    assert module.dino_head.last_layer.weight_v.shape == (64, 16)
    assert module.ibot_head.last_layer.weight_v.shape == (32, 8)
    assert module.teacher["ibot_head"].last_layer.weight_v.shape == (32, 8)
    # nn.Linear's init: uniform within 1/sqrt(fan_in) (std 1/sqrt(3 fan_in)), not std 0.02.
    v = module.dino_head.last_layer.weight_v
    assert v.abs().max() <= 16**-0.5 and v.std().item() == pytest.approx((3 * 16) ** -0.5, rel=0.1)
    assert torch.equal(module.dino_head.last_layer.weight_g, torch.ones(64))


def test_dinov2_weight_decay_groups_decay_tokens_and_prototypes():
    module = tiny_dino(no_decay_rule="dinov2", ibot_separate_head=True)
    optimizer = module.configure_optimizers()
    scale = {id(p): g["weight_decay_scale"] for g in optimizer.param_groups for p in g["params"]}
    by_name = {n: scale[id(p)] for n, p in module.named_parameters() if p.requires_grad}
    for name in [
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.register_tokens",
        "backbone.mask_token",
        "dino_head.last_layer.weight_g",
        "ibot_head.last_layer.weight_g",
        "backbone.blocks.0.attn.qkv.weight",
    ]:
        assert by_name[name] == 1.0, name  # fmt: skip
    for name in ["backbone.norm.weight", "backbone.blocks.0.norm1.bias", "dino_head.mlp.0.bias"]:
        assert by_name[name] == 0.0, name


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
@pytest.mark.parametrize("separate", [False, True])
def test_no_gradient_reaches_the_teacher(centering, separate):
    module = tiny_dino(centering=centering, ibot_separate_head=separate)
    terms = module.losses(multicrop_batch(), teacher_temp=0.04)
    assert set(terms) == {"dino", "ibot", "koleo", "loss"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert module.backbone.mask_token.grad is not None
    student = [p for n, p in module.named_parameters() if not n.startswith("teacher.")]
    assert all(p.grad is not None for p in student)


def test_teacher_starts_as_the_student_without_stochastic_depth():
    module = tiny_dino()
    student = module.student_state()
    teacher = module.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert module.teacher["backbone"].config.drop_path_rate == 0
    assert module.backbone.config.drop_path_rate == 0.1


def test_a_short_fit_updates_the_teacher_freezes_prototypes_and_reports_knn(tmp_path, demo_shards):
    L.seed_everything(0)
    module = tiny_dino(
        lr=1e-3,
        warmup_epochs=0.5,
        momentum_teacher=0.9,
        freeze_last_layer_epochs=1,
        num_local_crops=2,
    )
    prototypes = module.dino_head.last_layer.weight_v.detach().clone()
    teacher_before = module.teacher["backbone"].blocks[0].mlp.fc1.weight.detach().clone()
    data = demo_datamodule(
        demo_shards,
        batch_size=8,
        num_workers=0,
        samples_per_epoch=32,
        image_size=32,
        num_classes=10,
    )
    trainer = quiet_trainer(
        max_epochs=1,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    assert torch.equal(module.dino_head.last_layer.weight_v, prototypes)  # frozen in epoch 1
    teacher_after = module.teacher["backbone"].blocks[0].mlp.fc1.weight
    student_after = module.backbone.blocks[0].mlp.fc1.weight
    assert not torch.equal(teacher_after, teacher_before)
    assert not torch.equal(teacher_after, student_after)
    metrics = trainer.callback_metrics
    assert 0 <= metrics["val/knn_top1"] <= 1 and 0 <= metrics["val/linear_top1"] <= 1
    assert {"train/dino", "train/ibot", "train/koleo", "train/teacher_temp"} <= set(metrics)


class RecordMasks(L.Callback):
    def __init__(self):
        self.masks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks.append(batch["masks"].clone())


def test_dinov2_options_in_a_short_fit(demo_shards):
    """Stratified masks come through the DataModule's collate, the learning rate is scaled
    from the global batch of the run, parts are clipped on their own."""
    L.seed_everything(0)
    module = tiny_dino(
        lr=4e-3,
        lr_scaling="sqrt",
        stratified_masks=True,
        clip_grad_per_part=True,
        no_decay_rule="dinov2",
        blur_probabilities=(0.0, 0.9, 0.5),
    )
    data = demo_datamodule(
        demo_shards,
        batch_size=6,
        num_workers=1,
        samples_per_epoch=12,
        image_size=32,
        num_classes=10,
    )
    record = RecordMasks()
    trainer = quiet_trainer(
        max_epochs=1,
        gradient_clip_val=3.0,
        callbacks=[record],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    assert module.peak_lr == pytest.approx(4e-3 * math.sqrt(6 / 1024))
    assert len(record.masks) == 2
    for masks in record.masks:  # (6 images, 2 global crops, 16 patches): 6 of 12 crops masked
        assert masks.shape == (6, 2, 16) and int(masks.any(-1).sum()) == 6


def _fsdp_ema_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    module = tiny_dino()
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(1.0)  # the student moves away from the teacher
    before = {"student": module.student_state(), "teacher": dict(module.teacher.state_dict())}
    for part in (module.backbone, module.teacher["backbone"]):
        for block in part.blocks:
            fully_shard(block)
        fully_shard(part)
    fully_shard(module.dino_head)
    fully_shard(module.teacher["dino_head"])
    local_sizes = [p.to_local().numel() for p in module.teacher.parameters()]
    module.update_teacher(0.9)
    after = {k: v.full_tensor() for k, v in module.teacher.state_dict().items()}
    if rank == 0:
        torch.save({"before": before, "after": after, "local": local_sizes}, out)
    close_process_group()


def test_ema_updates_an_fsdp2_sharded_teacher_shard_by_shard(tmp_path):
    out = str(tmp_path / "ema.pt")
    mp.spawn(_fsdp_ema_rank, args=(2, free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    full = sum(t.numel() for t in got["before"]["teacher"].values())
    assert sum(got["local"]) < full  # each rank held only its shards
    for key, teacher in got["before"]["teacher"].items():
        expected = 0.9 * teacher + 0.1 * got["before"]["student"][key]
        torch.testing.assert_close(got["after"][key], expected, rtol=0, atol=1e-6)


def test_dino_loss_falls_below_uniform_when_the_views_agree():
    """Identical global crops: the student can predict the teacher, so the DINO loss leaves
    log(K), the value of a uniform prediction (and of a collapse)."""
    module = tiny_dino(koleo_loss_weight=0.0, ibot_loss_weight=0.0, momentum_teacher=0.99)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = {
        "global_crops": torch.stack([images, images], dim=1),
        "local_crops": torch.empty(0),
        "masks": torch.zeros(32, 2, 16, dtype=torch.bool),
    }
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    for _ in range(100):
        loss = module.losses(batch, teacher_temp=0.04)["dino"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.update_teacher(0.99)
    # Without local crops DINOv2 divides the two global pairs by 2 + 1: uniform gives 2/3 log K.
    assert loss.item() < 0.8 * (2 / 3) * math.log(64)


def test_two_process_ddp_fit_keeps_one_teacher_and_reports_knn(tmp_path, demo_shards):
    override = {
        "model": {
            "init_args": {
                "backbone": {"init_args": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
                "local_crop_size": 16,
                "num_local_crops": 2,
                "n_prototypes": 64,
                "head_hidden_dim": 48,
                "head_bottleneck_dim": 16,
                "knn_train_samples": 64,
                "linear_probe_steps": 20,
            }
        },
        "data": demo_data(demo_shards, samples_per_epoch=32),
    }
    path = write_yaml(tmp_path / "tiny.yaml", override)
    command = [
        sys.executable, "-m", "lightning_registers.cli", "fit",
        "--config", str(ROOT / "configs/demo/dino.yaml"), "--config", str(path),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false", "--experiment=ddp",
    ]  # fmt: skip
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ddp" / "version_0"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4  # 32 samples over 2 ranks of batch 4
    weights = state["state_dict"]
    key = "blocks.0.mlp.fc1.weight"
    assert not torch.equal(weights[f"teacher.backbone.{key}"], weights[f"backbone.{key}"])
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert len(events.Scalars("val/knn_top1")) == 1
    assert {
        "artifacts/student/high_norm_share_absolute/output",
        "artifacts/teacher/high_norm_share_absolute/output",
    } <= set(events.Tags()["scalars"])
