"""bench/figures.py's summary over --runs: each figure's minimum and median, the ratio taken within each run;
the PPO figure, timed as its TRL anchor times its own; and --profile's busy time."""
import argparse
import json
import os
import sys

import pytest
import torch

from bench import figures as bench
from bench import compile as bench_compile
from model import GPT, GPTConfig


def test_the_summary_gives_each_figures_minimum_and_median(capsys):
    bench.MEASURED.clear()
    for ours, theirs in [(100, 50), (300, 100), (200, 200)]:  # ratios 2, 3, 1
        bench.versus("lm step", "transformers", "tokens/s", ours, theirs, ours / theirs)
    bench.versus("ppo iteration", "TRL 0.29.1", "s", 1.5, 3.0, 2.0, "{:12.2f}")
    bench.summary(3)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "  transformers           50 tokens/s  ours / theirs 2.00x"
    assert out[-3] == "== minimum and median of 3 runs"
    assert out[-2] == "lm step        100 / 200 tokens/s; transformers 50 / 100; ours / theirs 1.00x / 2.00x"
    assert out[-1] == "ppo iteration  1.50 / 1.50 s; TRL 0.29.1 3.00 / 3.00; ours / theirs 2.00x / 2.00x"
    bench.MEASURED.clear()


def test_runs_below_one_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "--runs", "0"])  # in this process: a new one spends 4 s on imports
    with pytest.raises(SystemExit) as e:
        bench.main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "--runs must be at least 1, not 0" in err and not out


def test_the_ppo_figure_is_the_mean_of_two_iterations_after_a_warm_up(capsys, monkeypatch):
    def fake_train_ppo(*args, **kwargs):  # three iterations' seconds: the first, a warm-up, is left out
        rows = [(9.0, 9.0, 9.0), (0.5, 1.0, 2.0), (0.5, 3.0, 4.0)]
        with open(os.path.join(args[7], "metrics.jsonl"), "w") as f:
            for it, (generate, rollout, update) in enumerate(rows):
                f.write(json.dumps({"iteration": it, "seconds_generate": generate, "seconds_rollout": rollout,
                                    "seconds_update": update}) + "\n")
    monkeypatch.setattr(bench, "train_ppo", fake_train_ppo)
    monkeypatch.setattr(bench, "trl_anchor", lambda *args: None)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    bench.bench_ppo(GPT(cfg), cfg, argparse.Namespace(device="cpu", rollouts=4, prompt=4, new=4, profile=False, compile=False),
                    "fp32")
    # rollout 2.0 + update 3.0 on average; generate 0.5, scoring the rest of the rollout phase
    assert capsys.readouterr().out.startswith("ppo iteration          5.00 s  (generate 0.50, score 1.50, update 3.00;")


def test_a_profile_counts_each_kernel_once(capsys):
    """bench/figures.py --profile: on CUDA an op's row carries its kernels' time and each kernel has a row of
    its own, so the device's busy time is the kernels' rows alone (a list as torch's kineto parser
    builds it: an op of 50 us that launched a 40 us kernel); on the CPU, the ops' own time."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent
    op = FunctionEvent(id=1, name="aten::mm", thread=0, start_us=0, end_us=50, use_device="cuda", stack=[])
    op.append_kernel("gemm", 0, 40)
    kernel = FunctionEvent(id=2, name="gemm", thread=0, start_us=10, end_us=50, use_device="cuda",
                           device_type=DeviceType.CUDA, stack=[])
    events = EventList([op, kernel], use_device="cuda")
    events._build_tree()
    rows = events.key_averages()
    assert sum(e.self_device_time_total for e in rows) == 80  # counted twice
    assert bench_compile.busy_seconds(rows, cuda=True) == 40e-6
    bench_compile.profile(lambda: torch.ones(64, 64) @ torch.ones(64, 64), "cpu", "a product", calls=2)
    out = capsys.readouterr().out
    assert out.startswith("profile of a product: 2 calls,") and "aten::mm" in out
