"""A whole MPO pipeline from a random Qwen2.5-0.5B-shaped folder, on the CPU: python3 -m bench.pipeline
(minutes; a benchmark, not a test).

The folder has Qwen2.5-0.5B's shape (bench_memory.MODELS) with random bf16 weights and a small
tokenizer trained on the built-in task; the run is the built-in task with adapters of rank 16 on
every stage, bf16 autocast and checkpointing, one or two steps per stage on tiny batches. Each
stage runs in a process of its own (train.py --stages up to it; the stages before are reused),
so that its peak resident memory is its own. Writes results/bench/pipeline-qwen2-0.5b-cpu.txt
(the table) and .log (what train.py printed, with this machine's paths replaced).
"""
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["tokenizer", "sft", "rm", "split", "dpo", "ppo", "eval"]
FLAGS = ["--preset", "micro", "--dtype", "bf16", "--lora-rank", "16", "--lora-stages", "sft,rm,dpo,ppo",
         "--checkpointing", "--n-sft", "64", "--n-pref", "32", "--max-new-tokens", "16", "--easy-fraction", "0.5",
         "--sft-steps", "2", "--sft-batch-size", "4", "--rm-epochs", "1", "--rm-batch-size", "16",
         "--dpo-epochs", "1", "--dpo-batch-size", "16", "--ppo-iterations", "1", "--ppo-rollouts", "4",
         "--ppo-minibatches", "2", "--eval-prompts", "4", "--eval-samples", "1"]
# runs train.py's main in the child and prints its peak resident set (Linux: ru_maxrss in KiB) last
PEAK = "import resource, sys, train; train.main(sys.argv[1:]); print('peak KiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def random_folder(path):
    """Qwen2.5-0.5B's shape, random weights stored in bf16, a tokenizer of the built-in task."""
    from bench.memory import MODELS
    from plumbing.hf import save_hf_llama
    from llama import Llama
    from task import make_task
    from plumbing.tokenizer import Tokenizer
    tokenizer = Tokenizer.train([p + r for p, r in make_task(0, n_sft=300, n_pref=0)["sft"]], 400)
    torch.manual_seed(0)
    model = Llama(MODELS["qwen2-0.5b"]).to(torch.bfloat16)
    save_hf_llama(model, path, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    tokenizer.save(os.path.join(path, "tokenizer.json"))


def main():
    work = tempfile.mkdtemp()
    init, out = os.path.join(work, "qwen2-0.5b"), os.path.join(work, "run")
    random_folder(init)
    rows, log = [], []
    for i, stage in enumerate(STAGES):
        if stage == "tokenizer":  # runs with SFT (--checkpointing needs a stage that trains)
            continue
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", PEAK, *FLAGS, "--init", init, "--out", out,
                               "--stages", ",".join(STAGES[:i + 1])], cwd=ROOT, capture_output=True, text=True)
        seconds = time.time() - t0
        text = (proc.stdout + proc.stderr).replace(out, "RUN").replace(init, "INIT")
        log.append(f"### --stages ...,{stage}\n{text}")
        if proc.returncode:
            sys.exit(f"bench/pipeline.py: stage {stage} failed:\n{text[-3000:]}")
        peak = int(proc.stdout.strip().splitlines()[-1].split()[-1]) / 2 ** 20
        rows.append(f"| {stage} | {seconds:.0f} | {peak:.2f} |")
        print(rows[-1], flush=True)
    sizes = {stage: sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(os.path.join(out, stage))
                        for f in files) for stage in STAGES}
    text = ("# python3 -m bench.pipeline: the whole pipeline from a random Qwen2.5-0.5B-shaped bf16 folder on the CPU,\n"
            f"# torch {torch.__version__}, {os.cpu_count()} CPUs; flags: {' '.join(FLAGS)}\n"
            "# each stage in its own process (train.py --stages up to it, which also loads --init once to check it;\n"
            "# the tokenizer, copied from --init, in SFT's)\n"
            "| stage | seconds (process) | peak resident GiB |\n|---|---|---|\n" + "\n".join(rows)
            + "\n\n# the run folder's size by stage (MiB): a LoRA stage keeps its adapters alone\n| stage | MiB |\n|---|---|\n"
            + "\n".join(f"| {s} | {sizes[s] / 2 ** 20:.1f} |" for s in STAGES))
    base = os.path.join(ROOT, "results", "bench", "pipeline-qwen2-0.5b-cpu")
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    with open(base + ".log", "w") as f:
        f.write("\n".join(log))
    print(text)


if __name__ == "__main__":
    main()
