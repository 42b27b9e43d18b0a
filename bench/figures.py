"""Benchmarks that print figures (never timed tests), one line per figure, side by side in one run.

    python3 -m bench                         # GPT-2 124M shape on CUDA (bf16), the tiny preset on a CPU
    python3 -m bench --preset tiny --figures sample,cache
    python3 -m bench --preset qwen2-0.5b     # the Llama layout (llama.py) at Qwen2.5-0.5B's shape, random weights
    python3 -m bench --figures lm,dpo,sample,ppo --runs 3   # then each figure's minimum and median over the runs

Figures: lm (training step tokens/s and MFU), dpo (pairs/s and MFU, reference precomputed),
sample (new tokens/s), ppo (an iteration by phase, the mean of two after a warm-up), cache (KV
cache against recomputing the prefix), logp (the error of bf16 log-probs and of a TF32 head), ops
(aten ops per sampled token: kernel launches on a GPU), graphs (torch.compile's graphs per training
forward; these two in bench/compile.py), and, when transformers is installed, its GPT-2 of the same shape for lm
and sample, and, when `python3 -m bench.anchors --install` has put them in .anchors/, TRL's
DPOTrainer and PPOTrainer of the same shape for dpo and ppo (each in its own process).
MFU counts 6 x parameters (without position embeddings) per trained token against --peak-tflops.
--arch llama times the Llama layout at a preset's shape; the MODELS presets are real small open
models' shapes in that layout, with transformers' model of the same layout as the twin.
"""
import argparse
import collections
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from plumbing.hf import hf_llama_config
from dpo import pair_logps
from llama import Llama, LlamaConfig
from model import GPT, GPTConfig, ScalarModel, response_logprobs, token_logprobs
from sampling import generate
from ppo import PPOConfig, train_ppo
from bench import compile as bench_compile
from bench import memory as bench_memory
import training
from bench.memory import MODELS  # real small open models of the Llama layout: their shapes
from training import Runtime, autocast, compiled, default_dtype, optimizer_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
MEASURED = collections.defaultdict(list)  # (figure, anchor, unit, format) -> [(ours, theirs, speed-up)], a row per run
SHAPES = {  # the model shapes of train.py's presets (tests/test_structure.py keeps them equal)
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=1024),
    "micro": dict(n_layer=2, n_head=2, n_embd=64, block_size=96, vocab_size=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=1024),
}


def timed(fn, device, repeat=3, label=None):
    """Seconds per call, after one warm-up call (compilation, allocator); with a label, then a profile."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    seconds = (time.perf_counter() - t0) / repeat
    if label:
        bench_compile.profile(fn, device, label, min(repeat, 2))
    return seconds


def versus(figure, anchor, unit, ours, theirs, speedup, fmt="{:12,.0f}"):
    """Print the anchor's line under ours, keep both for --runs' summary. speedup: times faster (ours)."""
    print(f"  {anchor:<12} {fmt.format(theirs)} {unit}  ours / theirs {speedup:.2f}x")
    MEASURED[figure, anchor, unit, fmt].append((ours, theirs, speedup))


def summary(runs):
    """Each figure's minimum and median over the runs: ours, the anchor's, and the ratio (a ratio
    is measured side by side within one run, then summarised)."""
    print(f"== minimum and median of {runs} runs")
    for (figure, anchor, unit, fmt), rows in MEASURED.items():
        mm = lambda xs, f: f"{f.format(min(xs)).strip()} / {f.format(statistics.median(xs)).strip()}"
        ours, theirs, ratio = zip(*rows)
        print(f"{figure:<14} {mm(ours, fmt)} {unit}; {anchor} {mm(theirs, fmt)}; ours / theirs {mm(ratio, '{:.2f}x')}")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def unembedding(model):
    """The output embedding matrix (vocab, n_embd) of a GPT or a Llama."""
    if isinstance(model, GPT):
        return model.lm_head.weight
    return model.model.embed_tokens.weight if model.unembed is None else model.unembed.weight


@torch.no_grad()
def sample_without_cache(model, prompt, max_new_tokens, generator):
    """The naive loop: a full forward pass over the whole prefix for every new token."""
    seq = prompt
    for _ in range(max_new_tokens):
        probs = torch.softmax(model(seq)[:, -1].float(), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], 1)
    return seq[:, prompt.size(1):]


def lm_step(model, ids, opt, device, dtype, hf=False):
    with autocast(device, dtype):
        logits = model(ids).logits if hf else model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    optimizer_step(loss, opt, 1.0)


@torch.no_grad()
def logp_errors(model, seq, P, device):
    """|log p under bf16 autocast - log p in float32| per response token: with the vocabulary
    projection in float32 (model.GPT.output) and, as before it was, under autocast; and |log p with
    the float32 projection on TF32 - in true FP32|, TF32 emulated by rounding both operands (float32
    sums, as the tensor cores keep: what training.float32_matmuls costs). -> (logits' standard
    deviation, errors with the float32 projection, with the bf16 one, with the TF32 one)."""
    attn = torch.ones_like(seq)
    exact, _ = response_logprobs(model, seq, attn, P)
    logits = model(seq, attn, logits_from=P - 1)[:, :-1]
    hidden, weight = model(seq, attn, hidden=True)[:, P - 1:-1], unembedding(model).float()
    on_tf32 = token_logprobs(tf32(hidden) @ tf32(weight).T, seq[:, P:])
    with autocast(device, "bf16"):
        mixed, _ = response_logprobs(model, seq, attn, P)
        rounded = torch.nn.functional.linear(model(seq, attn, hidden=True)[:, P - 1:-1], unembedding(model))
    errors = lambda approx: (approx - exact).abs()
    return logits.std().item(), errors(mixed), errors(token_logprobs(rounded, seq[:, P:])), errors(on_tf32)


def tf32(x):
    """x rounded to TF32's 10 mantissa bits (to nearest), in float32: what a TF32 tensor core reads."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def hf_twin(cfg, device):
    """transformers' GPT-2 (or Llama, Qwen2) of the same shape, random weights; None without transformers."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    if isinstance(cfg, LlamaConfig):
        hf_cfg = hf_llama_config(cfg, eos_id=0, bos_id=0, pad_id=0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_cfg)).float().to(device)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(hf_cfg).to(device)


def trl_anchor(figure, cfg, a, dtype):
    """TRL's figure of the same shape from bench/anchors.py, run in its own process: (version, value),
    or None when the anchors are not installed or the run failed (one line says so)."""
    if isinstance(cfg, LlamaConfig):
        return None  # bench/anchors.py builds TRL's GPT-2
    if not os.path.isdir(os.path.join(ROOT, ".anchors")):
        print("  TRL          not installed: python3 -m bench.anchors --install")
        return None
    shape = dict(vocab=cfg.vocab_size, layers=cfg.n_layer, width=cfg.n_embd, heads=cfg.n_head, positions=cfg.block_size,
                 device=a.device, dtype=dtype, batch=a.batch, prompt=a.prompt, new=a.new, rollouts=a.rollouts)
    run = subprocess.run([sys.executable, "-m", "bench.anchors", figure,
                          *(f"--{k}={v}" for k, v in shape.items())], capture_output=True, text=True)
    if run.returncode:
        print(f"  TRL          failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
        return None
    _, version, value, _ = run.stdout.split()[-4:]  # its last line: "TRL 1.16.0 86.7 pairs/s"
    return version, float(value)


def mfu(tokens_per_s, params, peak):
    """The MFU suffix of a line: 6 x parameters per trained token against the peak; "" without one."""
    return f"  MFU {6 * params * tokens_per_s / (peak * 1e12):.1%}" if peak else ""


def bench_lm(model, train_model, cfg, a, dtype, peak):
    """Tokens/s and MFU of one language-model training step, against transformers' GPT-2 of the same shape."""
    T, B = a.prompt + a.new, a.batch
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=a.device)
    opt = model.configure_optimizers(1e-4, device_type=a.device)
    s = timed(lambda: lm_step(train_model, ids, opt, a.device, dtype), a.device, label=a.profile and "lm step")
    print(f"lm step        {B * T / s:12,.0f} tokens/s  (batch {B} x {T}){mfu(B * T / s, model.num_params(), peak)}")
    hf = hf_twin(cfg, a.device)
    if hf is not None:
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=a.device == "cuda")
        s_hf = timed(lambda: lm_step(hf, ids, hf_opt, a.device, dtype, hf=True), a.device)
        versus("lm step", "transformers", "tokens/s", B * T / s, B * T / s_hf, s_hf / s)


def bench_dpo(model, train_model, cfg, a, dtype, peak):
    """Pairs/s and MFU of one DPO step, against TRL's DPOTrainer of the same shape."""
    # one DPO step: B pairs = 2B rows through the policy; the reference's log-probs are precomputed
    T, B = a.prompt + a.new, a.batch
    ids = torch.randint(0, cfg.vocab_size, (2 * B, T), device=a.device)
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, a.prompt:] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "response_mask": response}
    ref = torch.zeros(B, device=a.device)
    opt = model.configure_optimizers(1e-6, device_type=a.device)

    def dpo_step():
        with autocast(a.device, dtype):
            chosen, rejected = pair_logps(train_model, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * ((chosen - ref) - (rejected - ref))).mean()
        optimizer_step(loss, opt, 1.0)
    s = timed(dpo_step, a.device, label=a.profile and "dpo step")
    print(f"dpo step       {B / s:12,.1f} pairs/s   (batch {B} pairs, {a.prompt} + {a.new} tokens)"
          f"{mfu(2 * B * T / s, model.num_params(), peak)}")
    trl = trl_anchor("dpo", cfg, a, dtype)
    if trl:
        versus("dpo step", f"TRL {trl[0]}", "pairs/s", B / s, trl[1], B / s / trl[1], "{:12,.1f}")


def bench_sample(model, cfg, a, dtype):
    """New tokens/s sampling with the KV cache, against transformers' generate of the same shape."""
    prompt = torch.randint(0, cfg.vocab_size, (a.rollouts, a.prompt), device=a.device)
    g = torch.Generator(device=a.device).manual_seed(0)
    model.eval()
    with autocast(a.device, dtype):
        s = timed(lambda: generate(model, prompt, None, a.new, generator=g), a.device, repeat=1,
                  label=a.profile and "sampling")
    n = a.rollouts * a.new
    print(f"sampling       {n / s:12,.0f} new tokens/s  (batch {a.rollouts}, {a.prompt} -> {a.new}, temperature 1)")
    hf = hf_twin(cfg, a.device)
    if hf is not None:
        hf.eval()
        with torch.no_grad(), autocast(a.device, dtype):
            s_hf = timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                             max_new_tokens=a.new, min_new_tokens=a.new, top_k=0,
                                             pad_token_id=0), a.device, repeat=1)
        versus("sampling", "transformers", "new tokens/s", n / s, n / s_hf, s_hf / s)


def bench_cache(model, cfg, a, dtype):
    """Sampling with the KV cache, against the naive loop that recomputes the whole prefix per new token."""
    prompt = torch.randint(0, cfg.vocab_size, (a.rollouts, a.prompt), device=a.device)
    g = torch.Generator(device=a.device).manual_seed(0)
    with autocast(a.device, dtype):
        cached = timed(lambda: generate(model, prompt, None, a.new, generator=g), a.device, repeat=1)
        naive = timed(lambda: sample_without_cache(model, prompt, a.new, g), a.device, repeat=1)
    print(f"KV cache       {naive / cached:12.2f}x faster than recomputing the prefix "
          f"({a.rollouts * a.new / cached:,.0f} against {a.rollouts * a.new / naive:,.0f} new tokens/s)")


def bench_ppo(model, cfg, a, dtype):
    """Seconds of one PPO iteration by phase, against TRL's PPOTrainer of the same shape."""
    # one PPO iteration with four models of this shape: policy, reference, reward model, critic
    class Ids:  # prompts are already token ids; no eos, so every response has full length
        eos_id, pad_id = cfg.vocab_size, 0
        stop_ids = [eos_id]
        encode = staticmethod(lambda ids: ids)
        decode = staticmethod(str)
    backbone = type(model)  # GPT or Llama
    reference = backbone(cfg).to(a.device).eval().requires_grad_(False)
    reward_model = ScalarModel(cfg, backbone).to(a.device).eval().requires_grad_(False)
    critic = ScalarModel(cfg, backbone).to(a.device)
    prompts = torch.randint(1, cfg.vocab_size, (4 * a.rollouts, a.prompt)).tolist()
    # a warm-up iteration, then the mean of two: as the TRL anchor times its iterations
    ppo_cfg = PPOConfig(iterations=3, rollouts=a.rollouts, epochs=4, minibatches=4, sample_every=0, save_every=0)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runtime = Runtime(compile=a.compile)
    with tempfile.TemporaryDirectory() as tmp:
        train_ppo(model, reference, reward_model, critic, Ids, prompts, ppo_cfg, tmp, a.new, a.device, dtype,
                  runtime=runtime)
        rows = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))][1:]
        if a.profile:  # one more iteration
            bench_compile.profile(lambda: train_ppo(model, reference, reward_model, critic, Ids, prompts, dataclasses.replace(
                ppo_cfg, iterations=1), os.path.join(tmp, "profile"), a.new, a.device, dtype, runtime=runtime),
                a.device, "ppo iteration", 1)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    total = mean("seconds_rollout") + mean("seconds_update")
    print(f"ppo iteration  {total:12.2f} s  (generate {mean('seconds_generate'):.2f}, score "
          f"{mean('seconds_rollout') - mean('seconds_generate'):.2f}, update {mean('seconds_update'):.2f}; "
          f"{a.rollouts} rollouts {a.prompt} -> {a.new}, 4 epochs x 4 minibatches, mean of {len(rows)} after a warm-up)")
    trl = trl_anchor("ppo", cfg, a, dtype)
    if trl:
        versus("ppo iteration", f"TRL {trl[0]}", "s", total, trl[1], trl[1] / total, "{:12.2f}")


def bench_logp(model, cfg, a):
    """The error of log-probs under bf16 autocast against float32, with the projection in float32 and in bf16."""
    # a random init's logits are small (bf16 rounds them little); a trained model's spread wider:
    # the final norm's gain 30 gives them a trained model's size (tens)
    seq = torch.randint(0, cfg.vocab_size, (min(a.batch, 16), a.prompt + a.new), device=a.device)
    final_norm = model.transformer.ln_f if isinstance(model, GPT) else model.model.norm
    for gain in (1.0, 30.0):
        with torch.no_grad():
            final_norm.weight.fill_(gain)
        std, ours, rounded, on_tf32 = logp_errors(model.eval(), seq, a.prompt, a.device)
        print(f"bf16 log-probs |error| per token, logits' sd {std:5.2f}: mean {ours.mean():.4f} max "
              f"{ours.max():.4f} nat; with bf16 logits (the projection under autocast) mean "
              f"{rounded.mean():.4f} max {rounded.max():.4f}; a TF32 projection (emulated) mean "
              f"{on_tf32.mean():.5f} max {on_tf32.max():.5f}")
    with torch.no_grad():
        final_norm.weight.fill_(1.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", default="gpt2" if cuda else "tiny", choices=[*SHAPES, *MODELS],
                   help="a preset's shape, or a real model's (MODELS: the Llama layout)")
    p.add_argument("--arch", default=None, choices=["gpt", "llama"],
                   help="the layout (default: gpt for a preset; llama: at a preset's shape, one key/value head "
                        "per query head and an MLP 4 x wide)")
    p.add_argument("--vocab", type=int, default=None, help="default: a model's own; for a preset 50257 on CUDA, "
                   "else the preset's")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=32, help="sequences per LM step, pairs per DPO step")
    p.add_argument("--prompt", type=int, default=128 if cuda else 32)
    p.add_argument("--new", type=int, default=256 if cuda else 48)
    p.add_argument("--rollouts", type=int, default=64, help="PPO rollouts per iteration; sampling batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward passes")
    p.add_argument("--figures", default="lm,dpo,sample,ppo,cache,logp", help="comma list; or memory alone: each "
                   "stage's peak memory at real shapes (bench/memory.py)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: from the GPU's name)")
    p.add_argument("--profile", action="store_true", help="after each timed figure, a few calls under torch.profiler: "
                   "the ops by their own time, printed")
    p.add_argument("--runs", type=int, default=1, help="run the figures this many times, one after the other, "
                   "then print each one's minimum and median")
    a = p.parse_args()
    if a.runs < 1:
        p.error(f"--runs must be at least 1, not {a.runs}")
    if a.figures == "memory":  # measured on fake tensors at real shapes: bench/memory.py
        return bench_memory.main([])
    dtype = a.dtype or default_dtype(a.device)
    training.float32_matmuls(a.device, dtype)  # as train.py sets it
    if a.preset in MODELS:
        if a.arch == "gpt":
            p.error(f"--preset {a.preset} is a model of the Llama layout: not with --arch gpt")
        cfg = dataclasses.replace(MODELS[a.preset], vocab_size=a.vocab or MODELS[a.preset].vocab_size)
    else:
        shape = SHAPES[a.preset]
        cfg = GPTConfig(vocab_size=a.vocab or (50257 if cuda else shape["vocab_size"]), n_layer=shape["n_layer"],
                        n_head=shape["n_head"], n_embd=shape["n_embd"],
                        block_size=max(shape["block_size"], a.prompt + a.new))
        if a.arch == "llama":
            cfg = LlamaConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, n_kv_head=cfg.n_head,
                              intermediate_size=4 * cfg.n_embd)
    figures = a.figures.split(",")
    peak = a.peak_tflops or (next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
                             if a.device == "cuda" else None)
    for run in range(a.runs):
        if a.runs > 1:
            print(f"== run {run + 1}")
        run_figures(cfg, a, dtype, figures, peak)
    if a.runs > 1:
        summary(a.runs)


def run_figures(cfg, a, dtype, figures, peak):
    """One run of the asked-for figures, on a model drawn from seed 0."""
    torch.manual_seed(0)
    model = (Llama if isinstance(cfg, LlamaConfig) else GPT)(cfg).to(a.device)
    train_model = compiled(model, a.compile)
    layout = f" in the Llama layout ({cfg.model_type})" if isinstance(cfg, LlamaConfig) else ""
    print(f"{a.preset} shape{layout} ({model.num_params() / 1e6:.1f}M parameters), {a.device}, {dtype}"
          f"{', compiled' if a.compile else ''}; torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if a.device == "cuda" else ""))

    # in this order whatever --figures says: each trains or samples the one model, and draws from the one seed
    if "lm" in figures:
        bench_lm(model, train_model, cfg, a, dtype, peak)
    if "dpo" in figures:
        bench_dpo(model, train_model, cfg, a, dtype, peak)
    if "sample" in figures:
        bench_sample(model, cfg, a, dtype)
    if "cache" in figures:
        bench_cache(model, cfg, a, dtype)
    if "ops" in figures:
        bench_compile.bench_ops(model, cfg, a, dtype)
    if "graphs" in figures:
        bench_compile.bench_graphs(model, cfg)
    if "ppo" in figures:
        bench_ppo(model, cfg, a, dtype)
    if "logp" in figures:
        bench_logp(model, cfg, a)
    if a.device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:11.1f} GiB")

if __name__ == "__main__":
    main()
