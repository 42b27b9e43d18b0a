"""bench.py's summary over --runs: each figure's minimum and median, the ratio taken within each run."""
import os
import subprocess
import sys

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_runs_below_one_is_refused_before_any_work():
    proc = subprocess.run([sys.executable, "bench.py", "--runs", "0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--runs must be at least 1, not 0" in proc.stderr and not proc.stdout
