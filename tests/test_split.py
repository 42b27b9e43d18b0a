"""mpo.py's reward-gap split against hand computations: the gaps, the strict threshold, the empty-side
error and the delta for an easy fraction."""
import pytest
import torch

from mpo import SplitError, delta_for_fraction, reward_gaps, split_by_gap


def test_split_by_gap_threshold_is_strict():
    """easy = gap > delta; a gap exactly equal to delta goes to hard."""
    gaps = torch.tensor([0.5, 1.0, 1.5, -2.0, 3.0])
    easy, hard = split_by_gap(gaps, 1.0)
    assert easy == [2, 4]
    assert hard == [0, 1, 3]


def test_split_by_gap_partitions_indices():
    """easy and hard are disjoint and together cover range(N)."""
    torch.manual_seed(0)
    gaps = torch.randn(50)
    easy, hard = split_by_gap(gaps, 0.3)
    assert sorted(easy + hard) == list(range(50))
    assert not set(easy) & set(hard)
    assert all(gaps[i] > 0.3 for i in easy) and all(gaps[i] <= 0.3 for i in hard)


@pytest.mark.parametrize("delta, empty", [(10.0, "easy"), (-5.0, "hard")])
def test_split_by_gap_empty_set_raises(delta, empty):
    """An empty side raises SplitError naming delta, the gap range and --easy-fraction."""
    gaps = torch.tensor([0.5, -2.0, 3.0])
    with pytest.raises(SplitError) as info:
        split_by_gap(gaps, delta)
    msg = str(info.value)
    assert f"delta {delta:g}" in msg and empty in msg
    assert "-2" in msg and "3" in msg  # the gap range
    assert "--easy-fraction" in msg


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_delta_for_fraction_gives_exact_easy_size(fraction):
    """With distinct gaps the easy set is exactly the round(f N) largest gaps."""
    torch.manual_seed(1)
    gaps = torch.randn(20)
    k = round(fraction * 20)
    delta = delta_for_fraction(gaps, fraction)
    easy = set((gaps > delta).nonzero().flatten().tolist())
    top_k = set(sorted(range(20), key=lambda i: -gaps[i].item())[:k])
    assert easy == top_k


def test_reward_gaps_signed_and_abs():
    """gap="signed" is chosen - rejected; gap="abs" its absolute value."""
    c, r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 1.5])
    assert reward_gaps(c, r).tolist() == [-2.0, 0.0, 0.5]
    assert reward_gaps(c, r, gap="abs").tolist() == [2.0, 0.0, 0.5]
