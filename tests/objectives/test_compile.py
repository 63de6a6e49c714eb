"""``compile``: every tower block's forward is compiled, one graph serves all blocks of a
tower (regional compilation), and training computes what eager training computes. Under DDP
and FSDP2: tests/test_scale_out.py."""

import pytest
import torch
from demo_run import demo_datamodule, quiet_trainer
from recorder import RecordLosses
from test_resume import losses

from lightning_registers.models import RegisterViT
from lightning_registers.objectives import ClipModule


def clip_module(compile: bool) -> ClipModule:
    torch.manual_seed(0)
    backbone = RegisterViT(
        "vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_registers=2
    )
    return ClipModule(
        backbone,
        num_classes=10,
        image_size=32,
        embed_dim=16,
        text_width=32,
        text_layers=2,
        text_heads=2,
        context_length=16,
        compile=compile,
        lr=1e-3,
        warmup_epochs=0.0,
    )


def test_compiled_clip_towers_train_as_eager_ones_with_one_graph_a_tower(tmp_path, demo_shards):
    recorded, checkpoints, modules = {}, {}, {}
    for compile in (False, True):
        torch._dynamo.reset()
        module = clip_module(compile)
        path = tmp_path / f"losses_{compile}.txt"
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[RecordLosses(path)])
        trainer.fit(module, datamodule=demo_datamodule(demo_shards, image_size=32))
        recorded[compile] = losses(path)
        trainer.save_checkpoint(tmp_path / f"compile_{compile}.ckpt")
        checkpoints[compile] = torch.load(tmp_path / f"compile_{compile}.ckpt", weights_only=True)
        modules[compile] = module
        blocks = module.tower_blocks()
        assert len(blocks) == 5  # 3 image blocks, 2 text blocks
        compiled = [hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks]
        assert compiled == [compile] * 5
    # One graph for the image blocks and one for the text blocks, not one a block.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert sorted(recorded[True]) == sorted(recorded[False]) == [1, 2, 3]
    for step, loss in recorded[False].items():
        assert recorded[True][step] == pytest.approx(loss, rel=1e-4)
    # Checkpoints are the eager model's: each loads into the module trained the other way.
    eager_state, compiled_state = (checkpoints[c]["state_dict"] for c in (False, True))
    assert list(compiled_state) == list(eager_state)
    modules[True].load_state_dict(eager_state, strict=True)
    modules[False].load_state_dict(compiled_state, strict=True)
