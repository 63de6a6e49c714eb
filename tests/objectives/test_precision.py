"""bf16 mixed precision: every objective trains, validates, checkpoints and resumes under it on
the CPU, and the validation metrics are computed in float32 from bf16 features (scores that
bf16 arithmetic would tie are told apart). FSDP2 in bf16: tests/test_scale_out.py."""

import pytest
import torch
from demo_run import ROOT, tiny_overrides, write_yaml
from test_resume import losses

from lightning_registers.cli import lightning_main
from lightning_registers.objectives.clip import retrieval_recall, zeroshot_accuracy
from lightning_registers.objectives.knn import knn_accuracy, linear_probe_accuracy

METRIC = {"supervised": "val/top1", "clip": "val/zeroshot_top1", "dino": "val/knn_top1"}
CLIP_TINY = [
    "--model.init_args.embed_dim=32",
    "--model.init_args.text_width=32",
    "--model.init_args.text_layers=1",
    "--model.init_args.text_heads=2",
]
# Scores 1 and 1 + 2**-20 are the same number in bf16 (8 bits of mantissa), not in float32.
NEAR = torch.tensor([[1.0, 0.0], [1.0, 2.0**-10]])


@pytest.mark.parametrize("objective", list(METRIC))
def test_every_objective_fits_validates_checkpoints_and_resumes_in_bf16_mixed(
    objective, tmp_path, demo_shards, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = ROOT / f"configs/demo/{objective}.yaml"
    recorder = {"class_path": "recorder.RecordLosses", "init_args": {"path": "losses.txt"}}
    callbacks = write_yaml(tmp_path / "callbacks.yaml", {"trainer": {"callbacks": [recorder]}})
    args = [
        "fit", "--config", str(config),
        "--config", str(tiny_overrides(tmp_path, demo_shards, config, samples_per_epoch=8)),
        "--config", str(callbacks), "--trainer.precision=bf16-mixed",
        "--trainer.limit_val_batches=4", "--trainer.enable_progress_bar=false",
        "--experiment=bf16", *(CLIP_TINY if objective == "clip" else []),
    ]  # fmt: skip
    first = lightning_main([*args, "--trainer.max_epochs=1"])
    assert first.trainer.precision == "bf16-mixed"
    assert 0.0 <= float(first.trainer.callback_metrics[METRIC[objective]]) <= 1.0
    last = tmp_path / "runs" / "bf16" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert sorted(losses(tmp_path / "losses.txt")) == [1, 2]

    (tmp_path / "losses.txt").unlink()
    resumed = lightning_main([*args, "--trainer.max_epochs=2", f"--ckpt_path={last}"])
    assert sorted(losses(tmp_path / "losses.txt")) == [3, 4]  # continued, not restarted
    assert METRIC[objective] in resumed.trainer.callback_metrics
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_zeroshot_accuracy_of_bf16_image_features_is_computed_in_float32():
    images = NEAR[1:].bfloat16()
    classifier = NEAR.T  # class 1 scores 1 + 2**-20, class 0 scores 1
    assert zeroshot_accuracy(images, classifier, torch.tensor([1])) == 1.0


def test_retrieval_recall_of_bf16_features_is_computed_in_float32():
    texts = NEAR.bfloat16()
    images = torch.tensor([[1.0, -1.0], [1.0, 2.0**-10]]).bfloat16()  # image 1 is text 1
    recall = retrieval_recall(images, texts, ks=(1,))
    assert recall["image_to_text_r1"] == 1.0


def test_knn_and_linear_probe_of_bf16_features_are_computed_in_float32():
    bank, labels = NEAR.bfloat16(), torch.tensor([0, 1])
    query = NEAR[1:].bfloat16()  # nearest: bank row 1, by about 2**-21 in cosine
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), num_classes=2, k=1) == 1.0
    probe = linear_probe_accuracy(bank, labels, bank, labels, num_classes=2, steps=20)
    assert probe == linear_probe_accuracy(bank.float(), labels, bank.float(), labels, 2, 20)
