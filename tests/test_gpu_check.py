"""bench/gpu_check.py, the script prepared for a lent GPU: its dry mode runs every step on the CPU at
tiny sizes (so the script cannot rot between GPUs), leaves at most the 8 files of at most 16 MiB
the device tool brings back, and a bad flag is one line and exit status 2. With stand-in steps: one
deadline for the whole call, summary.md and each step's output written as each step ends, the
pipeline's weights gone as soon as its table is written."""
import os
import subprocess
import sys
import time

from bench import gpu_check
from cli import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20


def what_comes_back(folder):
    """The files in folder, each checked against the device tool's limits: at most 8 plain files
    (no folder), each at most 16 MiB."""
    files = sorted(os.listdir(folder))
    assert len(files) <= 8 and all(os.path.isfile(folder / f) for f in files), files
    assert all(os.path.getsize(folder / f) <= 16 * MiB for f in files)
    return files


def test_the_dry_run_runs_every_step_and_leaves_what_comes_back(tmp_path, monkeypatch):
    """gpu_check --dry with each step's command run in this process (tests/cli.run_python; a new
    interpreter costs seconds of imports, five of them here), the test suite's step as a pytest
    session inside this one; how a step runs as a process is the part of the stand-in tests below."""
    def run_step(name, argv, seconds, path):
        with open(path, "a") as f:
            f.write(f"### {name}: {' '.join(argv)} (in the test's process)\n")
            return False, run_python(argv[1:], f)
    monkeypatch.setattr(gpu_check, "run_step", run_step)
    gpu_check.main(["--dry", "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    for step in ("cuda", "bench", "memory", "pipeline"):
        assert f"| {step} | ok |" in summary, summary
    bench = (tmp_path / "bench.txt").read_text()
    assert "lm step" in bench and "profile of lm step" in bench and "profile of sampling" in bench
    assert [line.split(" | ")[0] for line in (tmp_path / "pipeline.txt").read_text().splitlines()[2:]] == [
        "| tokenizer", "| sft", "| rm"]
    assert "run" not in what_comes_back(tmp_path)  # the pipeline's folder was never in --out


def test_the_real_run_selects_the_cuda_tests_as_the_dry_one():
    """-k cuda in both: the CPU tests of those files take a minute, and a compiled one alone more."""
    cuda = {dry: argv for dry in (False, True) for name, argv, *_ in gpu_check.steps("out", "run", dry) if name == "cuda"}
    assert cuda[False] == cuda[True] and cuda[False][-2:] == ["-k", "cuda"]


def stand_in_steps(monkeypatch, *commands):
    """gpu_check's steps replaced by Python one-liners, (name, code, seconds allowed, file); code may
    name OUT and RUN, the folders."""
    def steps(out, *run_and_dry):  # (out, dry) before the run folder moved out of --out
        run = run_and_dry[0] if len(run_and_dry) == 2 else os.path.join(out, "run")
        return [(name, [sys.executable, "-c", code.replace("OUT", repr(out)).replace("RUN", repr(run))], limit, target)
                for name, code, limit, target in commands]
    monkeypatch.setattr(gpu_check, "steps", steps)


def test_one_deadline_ends_the_call_and_every_step_reports(tmp_path, monkeypatch):
    """A step that would run past the whole call's deadline is stopped at it, the next ones are
    skipped, and summary.md says so: the call ends in time, with its evidence."""
    stand_in_steps(monkeypatch, ("cuda", "print('first', flush=True)", 30, "tests.txt"),
                   ("bench", "import time; print('slow', flush=True); time.sleep(60)", 30, "bench.txt"),
                   ("memory", "print('never')", 30, None))
    t0 = time.time()
    monkeypatch.setattr(gpu_check, "RESERVE", 1)
    deadline = gpu_check.RESERVE + 2  # 2 s for the steps: the first one, a bare interpreter, takes 0.1 s
    gpu_check.main(["--out", str(tmp_path), "--steps", "cuda,bench,memory", "--deadline", str(deadline)])
    assert time.time() - t0 < deadline
    rows = [line.split(" | ")[:2] for line in (tmp_path / "summary.md").read_text().splitlines()[4:]]
    assert rows == [["| cuda", "ok"], ["| bench", f"stopped by the {deadline} s deadline"],
                    ["| memory", f"skipped: the {deadline} s deadline is reached"]]
    assert "slow" in (tmp_path / "bench.txt").read_text()  # what the stopped step printed
    assert what_comes_back(tmp_path) == ["bench.txt", "env.json", "summary.md", "tests.txt"]


def test_each_step_ends_with_its_output_and_the_summary_written(tmp_path, monkeypatch):
    """The second step reads what the first left: summary.md with the first step's row and its
    output (a call stopped from outside keeps both). The pipeline's table is written and its run
    folder, with the weights, is gone before the next step; a file over 16 MiB is cut to its end."""
    seen = tmp_path / "seen"
    stand_in_steps(
        monkeypatch, ("cuda", "print('one test passed')", 30, "tests.txt"),
        ("pipeline", "import json, os; os.makedirs(os.path.join(RUN, 'sft')); open(os.path.join(RUN, 'sft', "
                     "'model.safetensors'), 'w').write('x' * 1000); json.dump({'seconds': 1.5, 'peak_gib': 2.0}, "
                     "open(os.path.join(RUN, 'sft', 'done.json'), 'w'))", 30, None),
        ("bench", f"import os, shutil; shutil.copytree(OUT, {str(seen)!r}); print('run folder', os.path.exists(RUN))",
         30, "bench.txt"),
        ("memory", "print('x' * (17 * 2 ** 20))", 30, None))
    out = tmp_path / "out"
    gpu_check.main(["--out", str(out), "--steps", "cuda,pipeline,bench,memory"])
    assert (seen / "summary.md").read_text().count(" | ok |") == 2 and "one test passed" in (seen / "tests.txt").read_text()
    assert "| sft | 1.5 | 2.0 |" in (seen / "pipeline.txt").read_text()
    assert "run folder False" in (out / "bench.txt").read_text()  # gone by the time bench ran
    assert what_comes_back(out) == ["bench.txt", "env.json", "log.txt", "pipeline.txt", "summary.md", "tests.txt"]
    assert (out / "log.txt").read_bytes().endswith(b"x" * 1000 + b"\n")


def test_a_bad_step_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--steps", "bench,warp"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--steps 'warp'" in proc.stderr
    assert not os.listdir(tmp_path)


def test_help_prints_the_device_command_carrying_the_wheels():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert 'run(command="PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $OUT", carry=[".whl"], timeout_s=600)' in proc.stdout
