"""The GPU check, prepared for one call on a lent GPU (about 8 minutes), every figure side by side:

    python3 gpu_check.py --download       # here, with a registry: the anchors' wheels into .whl/
    python3 gpu_check.py --out DIR        # on the GPU machine (offline): the steps below
    python3 gpu_check.py --dry --out DIR  # on the CPU at tiny sizes, in seconds: the test suite runs it

The steps, in order of what they are worth; each has its own time limit, and one that fails or
runs out does not stop the next:
  env       the GPU's name, torch and CUDA versions, the date             -> env.json
  anchors   TRL 1.16 (DPO) and 0.29.1 (PPO) from .whl/, offline (bench_anchors.py --install --wheels)
  cuda      the tests that need CUDA (tests/test_precision.py, tests/test_bench_memory.py)  -> tests.txt
  bench     bench.py at the GPT-2 124M shape, TRL and transformers beside it, each figure's profile
            (bench.py --profile: where the time goes), then the LM step compiled      -> bench.txt
  memory    bench_memory.py --device cuda: the README's rows and GPT-2's  -> memory-cuda.json, .txt
  pipeline  train.py --preset gpt2 with a few steps per stage: each stage's seconds and peak GiB
                                                                           -> pipeline.txt
  suite     the whole test suite (not by default: it does not fit the 8 minutes with the rest)
Every file lands in --out (at most 8: what the device tool brings back), with log.txt (what each
step printed) and summary.md (each step's status and seconds). Copy the figures into
results/bench/ and run python3 publish.py.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WHEELS = os.path.join(HERE, ".whl")
# what the GPU machine's image lacks of the anchors (bench_anchors.FOLDERS): it has accelerate,
# pandas, pyarrow, psutil, xxhash and dateutil (the device tool's KINDS.md); Python 3.12 there
GPU_WHEELS = ["trl==1.16.0", "trl==0.29.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def steps(out, dry):
    """[(name, argv, seconds allowed, file its stdout goes to or None)]: the full check, or at tiny
    sizes on the CPU (dry)."""
    py, run = sys.executable, os.path.join(out, "run")
    bench = ["--profile", "--preset", "micro", "--figures", "lm,sample", "--batch", "4", "--prompt", "8", "--new",
             "8", "--rollouts", "4"] if dry else ["--profile", "--figures", "lm,dpo,sample,ppo"]
    memory = (["--device", "cpu", "--models", "gpt2-124m", "--settings", "LoRA bf16 + ckpt", "--stages", "sft", "--no-check"]
              if dry else ["--device", "cuda", "--models", "gpt2-124m,qwen2-0.5b,qwen2-1.5b",
                           "--settings", "LoRA bf16 + ckpt,full bf16 + ckpt"])
    pipeline = (["--preset", "micro", "--stages", "tokenizer,sft,rm", "--n-sft", "100", "--n-pref", "50",
                 "--sft-steps", "2", "--rm-epochs", "1"] if dry else
                ["--preset", "gpt2", "--n-sft", "4000", "--n-pref", "2000", "--sft-steps", "200", "--rm-epochs", "1",
                 "--dpo-epochs", "1", "--ppo-iterations", "8", "--eval-prompts", "64"])
    return [
        ("anchors", [py, "bench_anchors.py", "--install", "--wheels", WHEELS], 60, None),
        ("cuda", [py, "-m", "pytest", "-q", "-rs", "tests/test_precision.py", "tests/test_bench_memory.py"]
         + (["-k", "cuda"] if dry else []), 90, "tests.txt"),
        ("bench", [py, "bench.py", *bench], 200, "bench.txt"),
        ("bench-compiled", [py, "bench.py", *bench[:-1], "lm", "--compile"] if not dry else [py, "-c", "pass"], 90, "bench.txt"),
        ("memory", [py, "bench_memory.py", "--out", os.path.join(out, "memory-cuda.json"), *memory], 100, None),
        ("pipeline", [py, "train.py", "--out", run, *pipeline], 150, None),
        ("suite", [py, "-m", "pytest", "-q", "-rs", "-x"], 420, "tests.txt"),
    ]


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the folder every file lands in")
    p.add_argument("--dry", action="store_true", help="on the CPU at tiny sizes: that every step runs")
    p.add_argument("--steps", default="anchors,cuda,bench,bench-compiled,memory,pipeline",
                   help="comma list of: anchors, cuda, bench, bench-compiled, memory, pipeline, suite")
    p.add_argument("--download", action="store_true", help=f"fetch the anchors' wheels into .whl/: {', '.join(GPU_WHEELS)}")
    a = p.parse_args(argv)
    if a.download:
        for pin in GPU_WHEELS:  # one at a time: pip resolves the two TRLs of one command as a conflict
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            *[f"--platform={x}" for x in PLATFORMS], "-d", WHEELS, pin], check=True)
        return
    if not a.out:
        p.exit(2, "gpu_check.py: error: --out DIR: the folder the files land in\n")
    known = [name for name, *_ in steps("", False)]
    wrong = [s for s in a.steps.split(",") if s not in known]
    if wrong:
        p.exit(2, f"gpu_check.py: error: --steps {wrong[0]!r}: choose from {', '.join(known)}\n")
    os.makedirs(a.out, exist_ok=True)
    env = environment()
    json.dump(env, open(os.path.join(a.out, "env.json"), "w"), indent=1)
    summary = [f"# gpu_check.py{' --dry' if a.dry else ''}: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, "
               f"{env['date']}", "", "| step | status | seconds |", "|---|---|---|"]
    log = open(os.path.join(a.out, "log.txt"), "a")
    for name, argv, limit, target in steps(a.out, a.dry):
        if name not in a.steps.split(","):
            continue
        if name == "anchors" and not os.path.isdir(WHEELS):
            summary.append(f"| {name} | skipped: no .whl/ (gpu_check.py --download) | 0 |")
            continue
        t0 = time.time()
        try:
            proc = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status, output = f"stopped at its {limit} s", (e.stdout or b"").decode() + (e.stderr or b"").decode()
        seconds = time.time() - t0
        log.write(f"### {name}: {' '.join(argv)}\n{output}\n")
        log.flush()
        if target:
            with open(os.path.join(a.out, target), "a") as f:
                f.write(f"### {name}\n{output}\n")
        summary.append(f"| {name} | {status} | {seconds:.0f} |")
        print(summary[-1], flush=True)
    if os.path.isdir(os.path.join(a.out, "run")):
        with open(os.path.join(a.out, "pipeline.txt"), "w") as f:
            f.write(pipeline_table(os.path.join(a.out, "run")) + "\n")
        shutil.rmtree(os.path.join(a.out, "run"))  # the weights stay behind
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
