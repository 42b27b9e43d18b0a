"""How close two computations of the same numbers must be when they add in different orders: packed
or padded rows, chunks of positions, micro-batches, ranks, compiled kernels, or another processor's
or build's kernels (ATEN_CPU_CAPABILITY=avx2 runs an AVX2 machine's on this one). Each such
comparison in the tests says in a comment which of the two rules it uses.

- Exact, in float64: where agreement is the point (one function computed two ways), the model and
  its inputs run in float64 and assert_exact allows 1e-10 of the compared tensor's largest entry.
  Any order of a sum of n terms is within about n 2^-53 of their size, so 1e-10 holds for sums of
  up to ~10^6 terms, while a fault (a token seen by another row, a missed gradient) moves a
  result by far more. In float32 such a comparison failed at 2.2e-5 with AVX2 kernels.
- From magnitudes, in float32: where a path runs in float32 alone (a whole train.py run, a saved
  file, transformers' model, torch.compile's kernels), network_atol: what two orders of the
  network's float32 sums can differ by, from the output's size and the number of terms summed.
"""
import torch

U32 = 2.0 ** -24  # float32's unit roundoff: a rounding moves a value by at most U32 of it
EXACT = 1e-10  # float64: far above any order's rounding, far below any fault


def assert_exact(actual, expected):
    """Two float64 computations of the same tensor agree to EXACT of its largest entry."""
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=EXACT * max(scale, 1e-30))


def float32_atol(terms, scale):
    """The most two float32 sums of `terms` terms whose magnitudes add to `scale` can differ by,
    in any two orders: each is within (terms - 1) U32 scale of the exact sum (Higham, Accuracy
    and Stability of Numerical Algorithms, 2002, eq. 4.4)."""
    return 2 * max(terms - 1, 1) * U32 * scale


def network_atol(output, widest, layers):
    """float32_atol for an output of two float32 computations of a network of `layers` layers and a
    head, whose sums have at most `widest` terms: each layer's rounding reaches the output at about
    the output's size (a residual stream under norms neither grows nor shrinks it much), so the
    terms add over layers + 1 sums, of magnitude max |output|, or 1 where the output is smaller (a
    score near 0 is a sum of terms that cancel, each about a norm's output, 1, times a weight)."""
    return float32_atol(widest * (layers + 1), max(output.abs().max().item(), 1.0))
