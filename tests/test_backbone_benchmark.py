"""The backbone benchmark's account of where a step's time goes: the share of matrix products
and fused attention, which compiling leaves as they are."""

import torch
import torch.nn.functional as F

from lightning_registers.benchmarks.backbone import library_share


def test_a_step_of_matrix_products_alone_is_all_library_time():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    # All but the dispatch of matmul to mm.
    assert library_share(lambda: (a @ b) @ b) > 0.9


def test_a_step_of_elementwise_ops_has_no_library_time():
    x = torch.randn(256, 256)
    assert library_share(lambda: torch.erf(x).exp().add(1)) == 0.0


def test_attention_and_its_backward_count_as_library_time():
    q = torch.randn(8, 6, 197, 64, requires_grad=True)

    def step():
        F.scaled_dot_product_attention(q, q, q).sum().backward()

    step()
    share = library_share(step)
    # The rest is the sum, its backward's expansion and the gradient's accumulation.
    assert 0.75 < share < 1.0
