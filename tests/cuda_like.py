"""A test mode in which the CPU's SDPA hands back its output as CUDA's fused kernels do.

CUDA's memory-efficient and flash kernels return q's shape (B, H, T, D) as a (B, T, H, D) tensor
transposed: the same values, not contiguous (strides (T H D, D, H D, 1)), so a `.view` after
attention that the CPU's contiguous output allows raises there. Under fused_sdpa_layout every
F.scaled_dot_product_attention call, wherever the project calls it (model.py and llama.py read it
from torch.nn.functional at each call), returns that layout, so a CPU test can run sampling and
the training forwards on what a GPU gives them."""
import contextlib

import torch.nn.functional as F


@contextlib.contextmanager
def fused_sdpa_layout():
    """Within it, SDPA's output is its usual values in the fused kernels' layout. Yields a list that
    counts the calls (one entry each), so a test can show the mode was in effect."""
    sdpa, calls = F.scaled_dot_product_attention, []

    def fused(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        calls.append(out.shape)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) memory, read as (B, H, T, D)

    F.scaled_dot_product_attention = fused
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa
