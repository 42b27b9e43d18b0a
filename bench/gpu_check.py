"""The GPU check, prepared for one call on a lent GPU (under 9 minutes), every figure side by side:

    python3 -m bench.gpu_check --download       # here, with a registry: the anchors' wheels into .whl/
    python3 -m bench.gpu_check --out DIR        # on the GPU machine (offline): the steps below
    python3 -m bench.gpu_check --dry --out DIR  # on the CPU at tiny sizes, in seconds: the test suite runs it

Through the device tool (600 s a command, at most 8 files of 16 MiB each brought back from $OUT;
.whl/ is ignored by git, so the call carries it):

    run(command="PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $OUT", carry=[".whl"], timeout_s=600)

The steps, in order of what they are worth; each has its own time limit, all of them one deadline
for the whole call (--deadline, 540 s), and one that fails or runs out does not stop the next:
  env       the GPU's name, torch and CUDA versions, the date             -> env.json
  anchors   TRL 1.16 (DPO) and 0.29.1 (PPO) from .whl/, offline (bench/anchors.py --install --wheels)
  cuda      the tests that need CUDA (-k cuda in tests/test_precision.py, tests/test_bench_memory.py),
            each test's outcome printed as it ends                             -> tests.txt
  bench     bench/figures.py at the GPT-2 124M shape, TRL and transformers beside it, each figure's profile
            (bench/figures.py --profile: where the time goes), then the LM step compiled      -> bench.txt
  memory    bench/memory.py --device cuda: the README's rows and GPT-2's  -> memory-cuda.json, .txt
  pipeline  train.py --preset gpt2 with a few steps per stage, in a folder outside --out: each
            stage's seconds and peak GiB                                   -> pipeline.txt
  suite     the whole test suite (not by default: it does not fit the deadline with the rest)
Every file lands in --out (these 8 at most, each cut to 16 MiB), each step's output streamed into
its file (or log.txt) as it runs, and summary.md (each step's status and seconds) rewritten as
each step ends: a call stopped from outside keeps what it had. Copy the figures into
results/bench/ and run python3 -m publish.
"""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
# what the GPU machine's image lacks of the anchors (bench_anchors.FOLDERS): it has accelerate,
# pandas, pyarrow, psutil, xxhash and dateutil (the device tool's KINDS.md); Python 3.12 there
GPU_WHEELS = ["trl==1.16.0", "trl==0.29.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


DEADLINE = 540  # seconds for the whole call: the device tool stops a command at 600
RESERVE = 5  # of them, kept for the last summary after a step stopped at the deadline
FILE_BYTES = 16 * 2 ** 20  # the most the device tool brings back of one file


def steps(out, run, dry):
    """[(name, argv, seconds allowed, file its output goes to, else log.txt)]: the full check, or at
    tiny sizes on the CPU (dry). run: the pipeline's run folder, outside out."""
    py = sys.executable
    bench = ["--profile", "--preset", "micro", "--figures", "lm,sample", "--batch", "4", "--prompt", "8", "--new",
             "8", "--rollouts", "4"] if dry else ["--profile", "--figures", "lm,dpo,sample,ppo"]
    memory = (["--device", "cpu", "--models", "gpt2-124m", "--settings", "LoRA bf16 + ckpt", "--stages", "sft", "--no-check"]
              if dry else ["--device", "cuda", "--models", "gpt2-124m,qwen2-0.5b,qwen2-1.5b",
                           "--settings", "LoRA bf16 + ckpt,full bf16 + ckpt"])
    pipeline = (["--preset", "micro", "--stages", "tokenizer,sft,rm", "--n-sft", "100", "--n-pref", "50",
                 "--sft-steps", "2", "--rm-epochs", "1"] if dry else
                ["--preset", "gpt2", "--n-sft", "2000", "--n-pref", "1000", "--sft-steps", "100", "--rm-epochs", "1",
                 "--dpo-epochs", "1", "--ppo-iterations", "4", "--eval-prompts", "32"])
    # -v: each outcome as it ends, kept if the step is stopped; -n 0: one test after another, in one
    # process (pytest.ini's workers would share the GPU)
    tests = [py, "-m", "pytest", "-n", "0", "-v", "--tb=short", "-rs"]
    return [  # each step's seconds: 500 in all, with env's in the 540 s deadline
        ("anchors", [py, "-m", "bench.anchors", "--install", "--wheels", WHEELS], 40, None),
        ("cuda", [*tests, "tests/test_precision.py", "tests/test_bench_memory.py", "-k", "cuda"], 100, "tests.txt"),
        ("bench", [py, "-m", "bench", *bench], 160, "bench.txt"),
        ("bench-compiled", [py, "-m", "bench", *bench[:-1], "lm", "--compile"] if not dry else [py, "-c", "pass"], 50, "bench.txt"),
        ("memory", [py, "-m", "bench.memory", "--out", os.path.join(out, "memory-cuda.json"), *memory], 60, None),
        ("pipeline", [py, "train.py", "--out", run, *pipeline], 90, None),
        ("suite", [*tests, "-x"], 420, "tests.txt"),
    ]


def run_step(name, argv, seconds, path):
    """argv's output streamed into path as it runs; stopped, with the processes it started, after
    seconds. Returns whether it was stopped, and its exit status."""
    with open(path, "a") as f:
        f.write(f"### {name}: {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, process_group=0)
        try:
            return False, proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its group: a benchmark's anchors, a test's workers
            return True, proc.wait()


def cut(folder):
    """Every file in folder to at most FILE_BYTES, keeping its end (a test run's summary, the last
    figures), as the device tool brings back no larger file."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.path.getsize(path) > FILE_BYTES:
            with open(path, "rb") as f:
                f.seek(-(FILE_BYTES - 100), os.SEEK_END)
                tail = f.read()
            with open(path, "wb") as f:
                f.write(b"[the start is cut: the device tool brings back 16 MiB of a file]\n" + tail)


def environment():
    import torch
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}


def pipeline_table(run):
    """Each stage's seconds and peak GiB (done.json) of the pipeline step's run folder."""
    rows = ["| stage | seconds | peak GiB |", "|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(run, "*", "done.json")), key=os.path.getmtime):
        done = json.load(open(path))
        rows.append(f"| {os.path.basename(os.path.dirname(path))} | {done['seconds']:.1f} | {done.get('peak_gib', '')} |")
    return "\n".join(rows)


def main(argv=None):
    t0 = time.time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the folder every file lands in")
    p.add_argument("--dry", action="store_true", help="on the CPU at tiny sizes: that every step runs")
    p.add_argument("--steps", default="anchors,cuda,bench,bench-compiled,memory,pipeline",
                   help="comma list of: anchors, cuda, bench, bench-compiled, memory, pipeline, suite")
    p.add_argument("--deadline", type=float, default=DEADLINE, help="seconds for the whole call, from its start: "
                   f"a step gets what is left, less {RESERVE} s (default {DEADLINE}: the device tool stops a command at 600)")
    p.add_argument("--download", action="store_true", help=f"fetch the anchors' wheels into .whl/: {', '.join(GPU_WHEELS)}")
    a = p.parse_args(argv)
    if a.download:
        for pin in GPU_WHEELS:  # one at a time: pip resolves the two TRLs of one command as a conflict
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            *[f"--platform={x}" for x in PLATFORMS], "-d", WHEELS, pin], check=True)
        return
    if not a.out:
        p.exit(2, "bench/gpu_check.py: error: --out DIR: the folder the files land in\n")
    known = [name for name, *_ in steps("", "", False)]
    wrong = [s for s in a.steps.split(",") if s not in known]
    if wrong:
        p.exit(2, f"bench/gpu_check.py: error: --steps {wrong[0]!r}: choose from {', '.join(known)}\n")
    os.makedirs(a.out, exist_ok=True)
    env = environment()
    json.dump(env, open(os.path.join(a.out, "env.json"), "w"), indent=1)
    summary = [f"# bench/gpu_check.py{' --dry' if a.dry else ''}: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, "
               f"{env['date']}, deadline {a.deadline:.0f} s", "", "| step | status | seconds |", "|---|---|---|"]
    run = tempfile.mkdtemp(prefix="gpu_check_run")  # the pipeline's weights: never in --out
    for name, argv, limit, target in steps(a.out, run, a.dry):
        if name not in a.steps.split(","):
            continue
        left = a.deadline - RESERVE - (time.time() - t0)
        started = time.time()
        if name == "anchors" and not os.path.isdir(WHEELS):
            status = "skipped: no .whl/ (bench/gpu_check.py --download here; the device call carries .whl)"
        elif left < 1:
            status = f"skipped: the {a.deadline:.0f} s deadline is reached"
        else:
            stopped, code = run_step(name, argv, min(limit, left), os.path.join(a.out, target or "log.txt"))
            status = ("ok" if code == 0 else f"failed (exit {code})") if not stopped else (
                f"stopped at its {limit} s" if limit <= left else f"stopped by the {a.deadline:.0f} s deadline")
            if name == "pipeline":
                with open(os.path.join(a.out, "pipeline.txt"), "w") as f:
                    f.write(pipeline_table(run) + "\n")
                shutil.rmtree(run, ignore_errors=True)  # the weights go as soon as their table is written
        cut(a.out)
        summary.append(f"| {name} | {status} | {time.time() - started:.0f} |")
        with open(os.path.join(a.out, "summary.md"), "w") as f:  # after each step: a stopped call keeps it
            f.write("\n".join(summary) + "\n")
        print(summary[-1], flush=True)
    shutil.rmtree(run, ignore_errors=True)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
