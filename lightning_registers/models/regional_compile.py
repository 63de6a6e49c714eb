"""Regional compilation: ``torch.compile`` each transformer block's forward rather than the
whole model. Blocks of one tower share their code, so one graph serves them all and compiling
takes seconds; module hooks (FSDP2's gathers) and activation checkpointing, which call a block,
stay outside the compiled code; parameter names, and so checkpoints, do not change."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def compile_blocks(blocks: Iterable[nn.Module]) -> None:
    """Compile the forward of each block in place (a block compiled before is left as is)."""
    for block in blocks:
        if "forward" not in vars(block):
            block.forward = torch.compile(block.forward)
