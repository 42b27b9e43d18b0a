"""gpu_check.py, the script prepared for a lent GPU: its dry mode runs every step on the CPU at
tiny sizes (so the script cannot rot between GPUs), leaves at most the 8 files the device tool
brings back, and a bad flag is one line and exit status 2."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_dry_run_runs_every_step_and_leaves_what_comes_back(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_check.py", "--dry", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("cuda", "bench", "memory", "pipeline"):
        assert f"| {step} | ok |" in summary, summary
    bench = (tmp_path / "bench.txt").read_text()
    assert "lm step" in bench and "profile of lm step" in bench and "profile of sampling" in bench
    assert [line.split(" | ")[0] for line in (tmp_path / "pipeline.txt").read_text().splitlines()[2:]] == [
        "| tokenizer", "| sft", "| rm"]
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8 and all(os.path.isfile(tmp_path / f) for f in files), files  # the run folder is gone


def test_a_bad_step_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_check.py", "--out", str(tmp_path), "--steps", "bench,warp"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--steps 'warp'" in proc.stderr
    assert not os.listdir(tmp_path)
