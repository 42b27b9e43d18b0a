"""Benchmarks that print figures (never timed tests).

    python bench.py --preset tiny        sampling with the KV cache vs recomputing the whole prefix
"""
import argparse
import time

import torch

from model import GPT, GPTConfig, generate
from train import PRESETS


@torch.no_grad()
def sample_without_cache(model, prompt, max_new_tokens, generator):
    """The naive loop: a full forward pass over the whole prefix for every new token."""
    seq = prompt
    for _ in range(max_new_tokens):
        probs = torch.softmax(model(seq)[:, -1].float(), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], 1)
    return seq[:, prompt.size(1):]


def timed(fn, device):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=48)
    a = p.parse_args()
    cfg = GPTConfig(vocab_size=PRESETS[a.preset]["vocab_size"], **PRESETS[a.preset]["model"])
    model = GPT(cfg).to(a.device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt), device=a.device)
    g = torch.Generator(device=a.device).manual_seed(0)
    n = a.batch * a.new
    cached = timed(lambda: generate(model, prompt, None, a.new, generator=g), a.device)
    naive = timed(lambda: sample_without_cache(model, prompt, a.new, g), a.device)
    print(f"sampling, {a.preset} on {a.device}, batch {a.batch}, {a.prompt} -> {a.new} tokens:")
    print(f"  KV cache     {n / cached:10.0f} new tokens/s")
    print(f"  recompute    {n / naive:10.0f} new tokens/s")
    print(f"  ratio        {naive / cached:10.2f}x (same run)")


if __name__ == "__main__":
    main()
