"""The GPU benchmark's parts that do not need a GPU: FLOP counting against the closed form,
the peak table, the step on the CPU (ours and timm compute the same), and that a machine
without a GPU writes no numbers into BENCHMARKS.md."""

import functools
import time

import pytest
import torch

from lightning_registers.benchmarks import __main__ as bench
from lightning_registers.benchmarks import gpu
from lightning_registers.benchmarks.data import stage_seconds_per_sample
from lightning_registers.benchmarks.gpu import (
    NOT_MEASURED,
    WORKLOADS,
    Workload,
    build,
    crops_for,
    loader_rates,
    measure,
    peak_tflops,
    step_flops,
)

TINY = Workload(
    "tiny multi-crop",
    dict(arch="vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
         num_registers=2),
    batch_size=2,
    crops=((2, 32), (3, 16)),
    teacher_crops=((2, 32),),
)  # fmt: skip


def vit_forward_flops(batch: int, side: int, patch: int, width: int, depth: int, extra: int):
    """Matmul FLOPs of a ViT forward: patch embedding, then per block qkv, attention scores,
    attention-weighted values, projection and the 4x MLP (2 FLOPs a multiply-add)."""
    patches = (side // patch) ** 2
    tokens = patches + extra
    embed = 2 * patches * 3 * patch * patch * width
    block = 2 * tokens * width * (3 * width + width + 8 * width) + 4 * tokens * tokens * width
    return batch * (embed + depth * block)


def test_step_flops_are_the_closed_form_of_forwards_and_backward():
    tokens_extra = 1 + 2  # [CLS] and 2 registers
    student = sum(
        vit_forward_flops(count * TINY.batch_size, side, 8, 32, 2, tokens_extra)
        for count, side in TINY.crops
    )
    teacher = vit_forward_flops(2 * TINY.batch_size, 32, 8, 32, 2, tokens_extra)
    # Backward costs two forwards, less the patch embedding's input gradient (images need none).
    input_gradient = sum(
        count * TINY.batch_size * 2 * (side // 8) ** 2 * 3 * 64 * 32 for count, side in TINY.crops
    )
    expected = teacher + 3 * student - input_gradient
    assert step_flops(TINY, torch.device("cpu"), dtype=torch.float32) == expected


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_the_peak_is_looked_up_by_device_name(name, peak):
    assert peak_tflops(name) == peak


def test_ours_and_timm_run_the_same_step_on_the_cpu():
    device = torch.device("cpu")
    (ours, _), (timm, _) = build(TINY, "ours", False, device), build(TINY, "timm", False, device)
    crops = crops_for(TINY, device)
    with torch.no_grad():
        for x in crops:
            torch.testing.assert_close(timm(x), ours(x), rtol=1e-5, atol=1e-5)
    for impl in ("ours", "timm"):
        result = measure(TINY, impl, False, device, steps=2, warmup=1, dtype=torch.bfloat16)
        assert result["images_per_s"] > 0 and result["peak_bytes"] is None


def test_the_loader_table_sets_each_pipeline_beside_its_workloads_demand():
    demand = {WORKLOADS[0].name: 1000.0, WORKLOADS[1].name: 200.0}
    rows = [line.split(" | ") for line in loader_rates(demand, torch.device("cpu"), samples=8)[2:]]
    assert [row[0].removeprefix("| ") for row in rows] == [
        "3-Augment 224 px, per sample",
        "3-Augment 224 px, photometric_on_device",
        "multi-crop 2 x 224 + 8 x 98 px, per sample",
        "multi-crop 2 x 224 + 8 x 98 px, photometric_on_device",
    ]
    for row, need in zip(rows, (1000, 1000, 200, 200), strict=True):
        rate, shown, workers = float(row[1]), float(row[2]), float(row[3])
        assert (
            rate > 0 and shown == need and workers == pytest.approx(need / rate, rel=0.03, abs=0.06)
        )
    # Only the on-device pipelines have a stage on the device, and it costs time there.
    shares = [row[4].removesuffix(" |") for row in rows]
    assert shares[0] == shares[2] == "none (in the worker)"
    assert float(shares[1]) > 0 and float(shares[3]) > 0


def test_the_stage_time_is_per_image_of_the_batch():
    calls = []

    def stage(batch):
        calls.append(batch["crops"].device)
        time.sleep(0.01)

    batch = {"crops": torch.zeros(4, 3, 2, 2), "params": {"sigma": torch.zeros(4)}}
    seconds = stage_seconds_per_sample(stage, batch, torch.device("cpu"), repeats=3)
    assert len(calls) == 4  # a warm-up, then the timed calls
    assert 0.01 / 4 <= seconds < 0.05 / 4


def test_the_whole_gpu_section_is_written_from_a_run_on_the_cpu(monkeypatch, capsys):
    """Every line of ``run`` on small workloads, compiled modes included, so that a lent GPU's
    minutes are not lost to an error at the end of the run."""
    # Crops of the shape of TINY's global crops, so that the compiled graphs serve both.
    tiny_supervised = Workload("tiny supervised", TINY.backbone, batch_size=4, crops=((1, 32),))
    monkeypatch.setattr(gpu, "WORKLOADS", (tiny_supervised, TINY))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    fast_loaders = functools.partial(gpu.loader_rates, samples=8)
    monkeypatch.setattr(gpu, "loader_rates", fast_loaders)
    lines = gpu.run(torch.device("cpu"))
    assert lines[0] == NOT_MEASURED[0] and "NVIDIA H200 (989 TFLOP/s dense bf16)" in lines[2]
    table = lines[lines.index("|---|---|---|---|---|---|---|---|") + 1 :]
    rows = [line.split(" | ") for line in table[: table.index("")]]
    assert [(row[0].removeprefix("| "), row[1], row[2]) for row in rows] == [
        (workload.name, impl, mode)
        for workload in (tiny_supervised, TINY)
        for impl, mode in (("ours", "eager"), ("timm", "eager"), ("ours", "compiled"),
                           ("timm", "compiled"))
    ]  # fmt: skip
    for row in rows:
        images_per_s, step_ms, tflops = float(row[3]), float(row[4]), float(row[5])
        assert images_per_s > 0 and step_ms > 0
        mfu = float(row[6].removesuffix(" %"))
        assert mfu == pytest.approx(100 * tflops / 989, abs=0.06)  # against the H200's peak
        assert row[7] == "n/a |"  # no device memory counter on the CPU
    loaders = [line for line in table if line.startswith("| multi-crop") or line.startswith("| 3-")]
    assert len(loaders) == 4
    # Each row was printed as it was measured.
    printed = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert printed == table[: table.index("")]


def test_without_a_gpu_nothing_is_measured_and_the_cpu_sections_keep_their_place(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "BENCHMARKS.md"
    cpu_part = "# Benchmarks\n\n## Backbone\n\n| a | b |\n"
    out.write_text(cpu_part)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit:
        bench.main(["gpu", "--out", str(out)])
    assert exit.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert out.read_text() == cpu_part

    # A CPU run replaces the sections it measures, keeps the others and a measured GPU
    # section, and adds the not-measured text where there is none.
    measured = "## GPU: training step, MFU, memory and loaders\n\n| H200 | 1 |\n"
    assert bench.split_gpu_section(cpu_part + measured) == (cpu_part, measured)
    out.write_text(cpu_part + "## Data\n\nold data\n\n")
    monkeypatch.setattr(bench, "SECTIONS", {"backbone": lambda: ["## Backbone", "", "new"]})
    bench.main(["--out", str(out), "--only", "backbone"])
    sections = bench.sections_of(out.read_text())
    assert list(sections) == ["## Backbone", "## Data", NOT_MEASURED[0]]
    assert "| a | b |" not in sections["## Backbone"] and "new" in sections["## Backbone"]
    assert "--only backbone`" in sections["## Backbone"]  # when, where and how it was measured
    assert sections["## Data"] == "## Data\n\nold data\n\n"
    out.write_text(cpu_part + measured)
    bench.main(["--out", str(out), "--only", "backbone"])
    assert out.read_text().endswith("new\n\n" + measured)
