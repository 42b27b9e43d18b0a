"""The statistics that carry a claim: paired intervals against hand computations, win/tie/loss,
K samples per prompt, greedy decoding and the aggregation over seeds."""
import math

import pytest
import torch

from evaluate import summarize, win_tie_loss
from model import GPT, GPTConfig
from sampling import generate
from plumbing.report import T975, aggregate, paired_interval, t975


def test_paired_interval_by_hand():
    # d = [1, 2, 2, 3]: mean 2, sd sqrt(2/3), n 4, t(3) = 3.182 -> half width 3.182 * 0.8165 / 2
    d = paired_interval([1, 2, 3, 4], [0, 0, 1, 1])
    mean, low, high = d["mean"], d["low"], d["high"]
    assert d["n"] == 4 and d["wins"] == 4
    half = 3.182 * math.sqrt(2 / 3) / 2
    assert mean == 2 and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert high - low == pytest.approx(2.598, abs=1e-3)
    # two seeds: t(1) = 12.706, d = [0.5, -0.1]: mean 0.2, sd 0.4243, half 12.706 * 0.4243 / sqrt(2)
    d = paired_interval([1.0, 0.9], [0.5, 1.0])
    assert d["mean"] == pytest.approx(0.2) and d["high"] - 0.2 == pytest.approx(12.706 * 0.3, rel=1e-3)
    assert d["wins"] == 1 and d["n"] == 2
    assert paired_interval([1.0], [0.0]) == {"mean": 1.0, "low": None, "high": None, "n": 1, "wins": 1}


def test_pairing_removes_what_both_share():
    """Per-prompt difficulty shared by both methods leaves a paired interval narrow."""
    g = torch.Generator().manual_seed(0)
    difficulty = (torch.randn(200, generator=g) * 3).tolist()
    a = [x + 0.5 + 0.1 * e for x, e in zip(difficulty, torch.randn(200, generator=g).tolist())]
    d = paired_interval(a, difficulty)
    mean, low, high = d["mean"], d["low"], d["high"]
    assert low > 0.4 and high < 0.6 and mean == pytest.approx(0.5, abs=0.05)


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(10) == 2.228 and t975(30) == T975[-1]
    for df, exact in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (10 ** 6, 1.95997)):
        assert t975(df) == pytest.approx(exact, abs=1e-3)
    assert all(a > b for a, b in zip(T975, T975[1:]))


def test_win_tie_loss():
    assert win_tie_loss([1, 2, 3, 0], [0, 2, 4, 0]) == (0.25, 0.5, 0.25)


def test_summarize_rates_against_sft_and_chosen():
    sft = {"gold_reward": [0.0, 1.0, 2.0, 0.0], "rm_score": [0.0] * 4, "kl_vs_sft": [0.0] * 4, "length": [5] * 4}
    mine = {**sft, "gold_reward": [1.0, 1.0, 0.0, 0.5], "greedy": [2.0] * 4}
    row = summarize(mine, sft, chosen=[(0, 2.0), (1, 1.0), (3, 0.0)])
    assert (row["win_vs_sft"], row["tie_vs_sft"], row["loss_vs_sft"]) == (0.5, 0.25, 0.25)
    assert row["win_rate_vs_sft"] == 0.625 and row["gold_reward"] == 0.625 and row["greedy"] == 2.0
    assert row["win_vs_chosen"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert summarize(sft, sft)["win_rate_vs_sft"] == 0.5 and "win_vs_chosen" not in summarize(sft, sft)


def test_greedy_generation_is_the_argmax():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.randint(0, 50, (3, 5))
    tokens, _ = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, seq[:, 5:])


def test_aggregate_keeps_each_seed_and_pairs_over_seeds():
    runs = [{"methods": {"sft": {"gold_reward": s}, "mpo": {"gold_reward": s + d}}, "config": {"seed": i},
             "split": {"delta": 1.0}} for i, (s, d) in enumerate([(0.0, 1.0), (0.5, 2.0), (-0.5, 3.0)])]
    agg = aggregate(runs)
    assert agg["per_seed"]["mpo"] == [r["methods"]["mpo"] for r in runs]
    mean, low, high = (agg["vs_mpo"]["sft"][k] for k in ("mean", "low", "high"))
    assert agg["vs_mpo"]["sft"]["wins"] == 3
    assert mean == 2.0 and high - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert agg["vs_mpo_over"] == "3 seeds" and agg["seeds"] == [0, 1, 2]
