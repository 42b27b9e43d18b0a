"""Peak memory of each stage's step, measured at real model shapes without a GPU or the memory:
python3 -m bench.memory (bench/figures.py --figures memory runs it).

Each step (an SFT step, a reward-model step, a DPO step, a whole PPO iteration: sampling,
scoring, old and reference log-probs, the update) runs the project's own code on fake tensors
(torch's FakeTensorMode: shapes and dtypes, no storage, no arithmetic), and PeakMemory counts the
bytes of every tensor storage alive at each op, as a caching allocator would hold them, and keeps
the peak. On CUDA, --device cuda runs the same steps for real and reports
torch.cuda.max_memory_allocated instead.

What fake tensors cannot see: CUDA's workspaces (cuBLAS, the attention kernels), the caching
allocator's fragmentation and the CUDA context; the table adds a stated margin for them (MARGIN).
The method is checked against a real run on the CPU at a small shape (--check): the peak of live
storages under the same mode with real tensors, and the process's resident-set growth.
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from plumbing.files import write_json, write_text
from llama import LlamaConfig
from model import GPTConfig
from bench.peak_memory import CudaPeak, PeakMemory, fake_world, materialize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
# on top of the live tensors: CUDA's workspaces and the caching allocator's fragmentation; the check's
# resident growth on the CPU (glibc's allocator) came to at most 18% above them
MARGIN = 1.2


# ----------------------------------------------------------------------------- the steps at real shapes

MODELS = {  # real small open models of the Llama layout, from their config.json: the shape only, random weights
    "qwen2-0.5b": LlamaConfig(vocab_size=151936, block_size=32768, n_layer=24, n_head=14, n_embd=896, n_kv_head=2,
                              intermediate_size=4864, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                              tie_word_embeddings=True, model_type="qwen2"),  # Qwen2.5-0.5B
    "qwen2-1.5b": LlamaConfig(vocab_size=151936, block_size=32768, n_layer=28, n_head=12, n_embd=1536, n_kv_head=2,
                              intermediate_size=8960, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                              tie_word_embeddings=True, model_type="qwen2"),  # Qwen2.5-1.5B
    "llama3.2-1b": LlamaConfig(vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_embd=2048, n_kv_head=8,
                               head_dim=64, intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               tie_word_embeddings=True),  # Llama-3.2-1B
}


def shapes():
    """The models measured: GPT-2 124M, MODELS' small open models and a 7B-class Llama."""
    return {"gpt2-124m": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), **MODELS,
            "llama-7b-class": LlamaConfig(vocab_size=128256, block_size=8192, n_layer=32, n_head=32, n_embd=4096,
                                          n_kv_head=8, intermediate_size=14336, rms_norm_eps=1e-5,
                                          rope_theta=500000.0, tie_word_embeddings=False)}


def check_shape():
    """The small shape the method is checked at, with real tensors beside the fake ones."""
    return GPTConfig(vocab_size=32000, block_size=512, n_layer=4, n_head=4, n_embd=256)


SETTINGS = {  # name: (dtype, adapters on every stage, activation checkpointing)
    "full fp32": ("fp32", False, False),
    "full bf16": ("bf16", False, False),
    "full bf16 + ckpt": ("bf16", False, True),
    "LoRA bf16": ("bf16", True, False),
    "LoRA bf16 + ckpt": ("bf16", True, True),
}


class Sizes:
    """The one-GPU preset's sizes: prompts up to 256 tokens, responses up to 64; SFT 32 rows, RM and
    DPO 32 pairs, PPO 64 rollouts of 64 new tokens in 4 epochs x 4 minibatches."""
    prompt, response, rows, pairs, rollouts, epochs, minibatches = 256, 64, 32, 32, 64, 4, 4
    micro_batch = 0  # PPO's --ppo-micro-batch
    grad_accum = 1  # SFT, RM and DPO: rows in this many micro-batches


def lengths(n, top, generator):
    """n lengths between top / 2 and top: padded batches as real data makes them."""
    with unset_fake_temporarily():  # real numbers, made inside fake_world
        return torch.randint(top // 2, top + 1, (n,), generator=generator).tolist()


def text_batch(n, vocab, generator, pairs=False):
    """A collated batch (data.collate / data.pair_batch) of random token ids at Sizes' lengths."""
    import data
    with unset_fake_temporarily():  # real token ids, made inside fake_world
        ids = lambda k: torch.randint(3, vocab, (k,), generator=generator).tolist()
        prompts = [ids(k) for k in lengths(n, Sizes.prompt, generator)]
        answers = lambda: [ids(k) + [1] for k in lengths(n, Sizes.response - 1, generator)]
        if not pairs:
            return data.collate(prompts, answers(), pad_id=0)
        return data.collate(prompts + prompts, answers() + answers(), pad_id=0)  # chosen rows, then rejected


def build(config, kind):
    """A model of `config` on the meta device (no memory), to be cast and adapted as a stage does
    before materialize makes its tensors fake."""
    from llama import Llama
    from model import GPT, ScalarModel
    backbone = Llama if isinstance(config, LlamaConfig) else GPT
    with unset_fake_temporarily(), torch.device("meta"):
        return ScalarModel(config, backbone) if kind == "scalar" else backbone(config)


def memory_of(setting):
    from lora import LoRAConfig
    from training import Memory
    dtype, adapters, checkpointing = SETTINGS[setting]
    return Memory(LoRAConfig(rank=16, stages="sft,rm,dpo,ppo") if adapters else LoRAConfig(), checkpointing, dtype)


def step_sft(config, memory, tracker, generator, stage="sft"):
    """One SFT step (stage "rm": one reward-model step) on a batch, as training.fit runs it."""
    from model import response_token_logps, sft_loss
    from reward import bt_loss, reward_of
    from training import autocast, backward, optimizer_step
    with unset_fake_temporarily():  # built on the meta device, cast and adapted as the stage does
        model = memory.trained(build(config, "scalar" if stage == "rm" else "gpt"), stage).train()
    materialize(tracker, model)
    opt = model.configure_optimizers(1e-5)
    batch = text_batch(Sizes.pairs if stage == "rm" else Sizes.rows, config.vocab_size, generator, pairs=stage == "rm")
    with tracker:
        batch = {k: tracker.fake_of(v) for k, v in batch.items()}
        for _ in range(2):  # the second step has AdamW's state
            with autocast(tracker.device, memory.dtype):
                if stage == "rm":
                    chosen, rejected = reward_of(model, batch).chunk(2)
                    loss = bt_loss(chosen, rejected)
                else:
                    loss = sft_loss(response_token_logps(model, batch), batch["response_mask"])
            backward(loss)
            optimizer_step(None, opt, 1.0)


def step_dpo(config, memory, tracker, generator):
    """One DPO step: the policy trained against the reference's precomputed log-probs, the reference
    resident (with adapters it is the policy's base: nothing more)."""
    from dpo import dpo_loss, pair_logps
    from mpo import reference_of
    from training import autocast, backward, optimizer_step
    with unset_fake_temporarily():  # built on the meta device, cast and adapted as mpo.dpo_stage does
        policy = memory.trained(build(config, "gpt"), "dpo").train()
        reference = reference_of(policy, True, lambda: build(config, "gpt"), memory)
    materialize(tracker, policy, reference)
    opt = policy.configure_optimizers(1e-6)
    batch = text_batch(Sizes.pairs, config.vocab_size, generator, pairs=True)
    with tracker:
        batch = {k: tracker.fake_of(v) for k, v in batch.items()}
        ref = torch.zeros(Sizes.pairs, device=tracker.device)
        for _ in range(2):
            with autocast(tracker.device, memory.dtype):
                chosen, rejected = pair_logps(policy, batch)
                loss = dpo_loss(chosen, rejected, ref, ref, 0.1)[0].mean()
            backward(loss)
            optimizer_step(None, opt, 1.0)


class Tokens:
    """A stand-in tokenizer for train_ppo: each prompt string is its length in tokens."""
    pad_id, eos_id, vocab_size = 0, 1, None
    stop_ids = [eos_id]

    def encode(self, text):
        return [5] * int(text)


def step_ppo(config, memory, tracker, generator, folder, epochs=None):
    """One whole PPO iteration, train_ppo itself: sampling with the KV cache, scoring, the old and
    reference log-probs and values, and the update's epochs x minibatches. epochs=1 measures the
    first epoch alone: the others repeat its minibatches' shapes on the same optimizer state, so
    they reach the same peak (check_method compares the two)."""
    from mpo import reference_of
    from stages import reward_model_of
    from ppo import PPOConfig, train_ppo
    with unset_fake_temporarily():  # built on the meta device, cast and adapted as mpo.ppo_stage does
        policy = memory.trained(build(config, "gpt"), "ppo")
        reference = reference_of(policy, True, lambda: build(config, "gpt"), memory)
        critic = memory.trained(build(config, "scalar"), "ppo")
        reward_model = reward_model_of(critic, lambda: build(config, "scalar"), memory)
    cfg = PPOConfig(iterations=1, rollouts=Sizes.rollouts, epochs=epochs or Sizes.epochs, minibatches=Sizes.minibatches,
                    save_every=0, sample_every=0, micro_batch=Sizes.micro_batch)
    prompts = [str(k) for k in lengths(Sizes.rollouts, Sizes.prompt, generator)]
    materialize(tracker, policy, reference, critic, reward_model)
    with tracker:
        train_ppo(policy, reference, reward_model, critic, Tokens(), prompts, cfg, folder, Sizes.response,
                  tracker.device, memory.dtype, 0)


def measure(config, setting, stage, folder, fake=True, epochs=1, device="cpu"):
    """Peak GiB of one stage's step for a model config under `setting`: on fake tensors, or with
    fake=False for real (the check of the method); device "cuda": for real on the GPU, the
    allocator's peak. PPO runs `epochs` of the update (None: all)."""
    memory, generator = memory_of(setting), torch.Generator().manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    world = CudaPeak() if device == "cuda" else fake_world() if fake else contextlib.nullcontext(PeakMemory())
    with world as tracker:
        if stage in ("sft", "rm"):
            step_sft(config, memory, tracker, generator, stage)
        elif stage == "dpo":
            step_dpo(config, memory, tracker, generator)
        else:
            step_ppo(config, memory, tracker, generator, os.path.join(folder, "ppo-memory"), epochs)
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / GiB
    return tracker.peak / GiB


def resident_growth(setting, stage, folder):
    """The process's peak resident memory over the step, less what it held before (GiB): a real run
    in a process of its own, on the CPU."""
    code = (f"import torch; from bench import memory as b; torch.manual_seed(0); b.warm_up({folder!r}); "
            f"before = b.rss('VmRSS'); open('/proc/self/clear_refs', 'w').write('5'); "
            f"b.measure(b.check_shape(), {setting!r}, {stage!r}, {folder!r}, fake=False); "
            f"print((b.rss('VmHWM') - before) / 2**30)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(out.stdout.split()[-1])


def warm_up(folder):
    """Every stage once at a tiny shape: the kernels' code and the allocator's pools are paged in
    before the resident memory is read."""
    saved = {k: getattr(Sizes, k) for k in ("prompt", "response", "rows", "pairs", "rollouts")}
    for k, v in dict(prompt=16, response=8, rows=4, pairs=4, rollouts=8).items():
        setattr(Sizes, k, v)
    try:
        for stage in ("sft", "rm", "dpo", "ppo"):
            measure(GPTConfig(vocab_size=32000, block_size=64, n_layer=1, n_head=4, n_embd=256), "full fp32", stage,
                    folder, fake=False)
    finally:
        for k, v in saved.items():
            setattr(Sizes, k, v)


def rss(field):
    with open("/proc/self/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) * 1024


def allocated_peak(setting, stage, folder):
    """The peak of the bytes torch's CPU allocator handed out over a real run of the step, from
    torch.profiler's memory events (an accounting independent of PeakMemory's): GiB."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        measure(check_shape(), setting, stage, folder, fake=False)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak / GiB


def check_method(folder, setting="full fp32"):
    """The fake measurement against real runs at a small shape, each stage: (stage, on fake tensors,
    PeakMemory on real tensors, the allocator's peak from torch.profiler, the process's resident
    growth), GiB."""
    rows = [(stage, measure(check_shape(), setting, stage, folder), measure(check_shape(), setting, stage, folder, fake=False),
             allocated_peak(setting, stage, folder), resident_growth(setting, stage, folder))
            for stage in ("sft", "rm", "dpo", "ppo")]
    all_epochs = measure(check_shape(), setting, "ppo", folder, epochs=None)
    return rows + [("ppo, all epochs", all_epochs, None, None, None)]


# ----------------------------------------------------------------------------- the table

STAGES = ["sft", "rm", "dpo", "ppo"]
CARDS = [24, 40, 80]  # GiB of the cards people have


def row_order(row):
    """(model, setting) in the order of shapes() and SETTINGS, others after: the table's rows."""
    place = lambda x, known: list(known).index(x) if x in known else len(known)
    return place(row[0], shapes()), place(row[1], SETTINGS), row


def table(rows):
    """Markdown: model x setting -> the peak GiB of each stage, and the smallest card that holds
    every stage with MARGIN."""
    lines = ["| model | setting | SFT | RM | DPO | PPO | fits (with the margin) |", "|---|---|---|---|---|---|---|"]
    for (model, setting), peaks in sorted(rows.items(), key=lambda item: row_order(item[0])):
        cells = [("OOM" if peaks[s] is None else f"{peaks[s]:.1f}") if s in peaks else "not yet" for s in STAGES]
        worst = max(math.inf if p is None else p for p in peaks.values()) * MARGIN
        fits = next((f"{c} GB" for c in CARDS if worst <= c), "none of " + "/".join(map(str, CARDS)))
        if len(peaks) < len(STAGES):  # a stage not measured yet: what the others rule out only
            fits = "not 24 GB" if worst > CARDS[0] else "(a stage not measured)"
        lines.append(f"| {model} | {setting} | " + " | ".join(cells) + f" | {fits} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(shapes()), help="comma list of: " + ",".join(shapes()))
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ",".join(SETTINGS))
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--out", help="each measurement is added to this file as it finishes; a rerun measures what "
                   "is missing (default: results/bench/memory.json, with --device cuda memory-cuda.json)")
    p.add_argument("--check", action="store_true", help="only the check of the method at a small shape")
    p.add_argument("--no-check", action="store_true", help="measure without checking the method first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: each step for real on the GPU, torch.cuda.max_memory_allocated")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench/memory.py: error: --device cuda: torch sees no CUDA device\n")
    a.out = a.out or os.path.join(ROOT, "results", "bench", "memory-cuda.json" if a.device == "cuda" else "memory.json")
    for name, allowed in (("models", shapes()), ("settings", SETTINGS), ("stages", STAGES)):
        wrong = [x for x in getattr(a, name).split(",") if x not in allowed]
        if wrong:
            p.exit(2, f"bench/memory.py: error: --{name} {wrong[0]!r}: choose from {', '.join(allowed)}\n")
    folder = tempfile.mkdtemp()
    done = json.load(open(a.out)) if os.path.exists(a.out) else {"measured": {}, "check": None}
    if a.device == "cuda":  # the allocator's own figures: no method to check, the GPU to name
        done["device"] = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                          f"{time.strftime('%Y-%m-%d')}")
    elif a.check or (done["check"] is None and not a.no_check):
        done["check"] = check_method(folder)
        write_json(a.out, done)
    for key in (f"{m} | {s} | {st}" for m in a.models.split(",") for s in a.settings.split(",") for st in a.stages.split(",")):
        if key not in done["measured"] and not a.check:
            model, setting, stage = key.split(" | ")
            t0 = time.time()
            try:
                done["measured"][key] = measure(shapes()[model], setting, stage, folder, device=a.device)
            except torch.cuda.OutOfMemoryError:  # recorded: the card does not hold it
                done["measured"][key] = None
            figure = "out of memory" if done["measured"][key] is None else f"{done['measured'][key]:.2f} GiB"
            print(f"{key}: {figure} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            write_json(a.out, done)
    print(report(done))
    write_text(os.path.splitext(a.out)[0] + ".txt", report(done) + "\n")


def by_row(done):
    """memory.json's measurements as {(model, setting): {stage: peak GiB}}."""
    rows = {}
    for key, peak in done["measured"].items():
        model, setting, stage = key.split(" | ")
        rows.setdefault((model, setting), {})[stage] = peak
    return rows


def report(done):
    """What bench/figures.py --figures memory prints, and results/bench/memory.txt holds, from the JSON."""
    rows = by_row(done)
    if "device" in done:  # --device cuda
        return (f"# python3 -m bench.memory --device cuda: torch.cuda.max_memory_allocated per stage (GiB), on\n"
                f"# {done['device']}, at the sizes of bench.memory.Sizes; PPO is one whole iteration.\n"
                f"# Fits: the largest stage times {MARGIN} (fragmentation, workspaces) within the card.\n" + table(rows))
    if done["check"] is None:  # --no-check
        return table(rows)
    cell = lambda x: "" if x is None else f"{x:.3f}"
    check = "\n".join(f"| {stage} | " + " | ".join(cell(x) for x in figures) + " |" for stage, *figures in done["check"])
    return (f"# python3 -m bench.memory: peak GiB of live tensor storage per stage, measured on fake tensors\n"
            f"# (FakeTensorMode) at the sizes of bench.memory.Sizes; PPO is one whole iteration. Fits: the\n"
            f"# largest stage times {MARGIN} (CUDA workspaces, the allocator's fragmentation) within the card.\n"
            + table(rows) + "\n\n# the check of the method, full fp32 at bench.memory.check_shape() (GiB): "
            "on fake tensors, PeakMemory\n# on real tensors, the CPU allocator's peak (torch.profiler), "
            "the process's resident growth\n| stage | fake | real | allocator | resident |\n|---|---|---|---|---|\n"
            + check)


ONE_GPU = {"gpu24": ("qwen2-1.5b", "LoRA bf16 + ckpt"), "full": ("qwen2-0.5b", "full bf16 + ckpt")}  # README's commands


def doc_blocks(path):
    """publish/documents.py's blocks from memory.json at `path`: the measured peaks of README.md's one-GPU
    commands (memory-gpu24, memory-full), docs/running.md's table (memory) and its cards."""
    if not os.path.exists(path):
        return {}
    rows = by_row(json.load(open(path)))
    blocks = {"memory": table(rows)}  # and which rows each card holds, every stage with the margin:
    whole = {row: max(peaks.values()) * MARGIN for row, peaks in sorted(rows.items(), key=lambda r: row_order(r[0]))
             if len(peaks) == len(STAGES) and None not in peaks.values()}
    blocks["memory-cards"] = "\n".join(f"- {card} GB: " + (", ".join(
        f"{model} {setting}" for (model, setting), worst in whole.items() if worst <= card and (i == 0 or worst > CARDS[i - 1]))
        or "nothing more") for i, card in enumerate(CARDS))
    for name, row in ONE_GPU.items():
        peaks = rows.get(row, {})
        figures = ", ".join(f"{stage.upper()} {peaks[stage]:.1f}" for stage in STAGES if stage in peaks)
        blocks[f"memory-{name}"] = (f"Measured peak GiB per stage (`python3 -m bench.memory`, {row[0]} shape, {row[1]}): "
                                    + (figures or "not measured yet"))
    return blocks


if __name__ == "__main__":
    main()
