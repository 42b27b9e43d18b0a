"""Graph breaks of the training forward under torch.compile, counted on the CPU by
torch._dynamo.explain (it traces, it does not compile): the log-probs forward of SFT, DPO and PPO
(model.logps_at) and the hidden-state forward of the reward model and the critic, on CUDA's aligned
rows (packing.align_plan) and on the CPU's packed rows (packing.pack), at a model's shape with two
layers (a block adds no break). bench/figures.py --figures graphs prints them; --figures ops prints the aten
ops per sampled token (OpCount), each a kernel launch on a GPU; --profile follows each timed figure
with a profile of where its time goes (profile):

    python3 -m bench --preset gpt2 --vocab 50257 --figures graphs
    python3 -m bench --preset qwen2-0.5b --figures graphs
"""
import dataclasses
import time

import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

import data
from plumbing import packing
from model import LOGIT_CHUNK_BYTES, positions
from sampling import generate
from training import DYNAMO, autocast


def training_batch(vocab_size, rows, seed=0):
    """data.collate's layout: prompts of 2-11 tokens left-padded, responses of 1-19 right-padded."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(2, vocab_size, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()
    return data.collate([draw(2, 12) for _ in range(rows)], [draw(1, 20) for _ in range(rows)], pad_id=0)


def forwards(model, batch):
    """{name: (args, kwargs)} of the training forwards on a collated batch, as model.logps_at and
    ScalarModel call them."""
    seq, attn = batch["input_ids"], batch["attention_mask"]
    scored_tokens = batch["response_mask"].bool().clone()
    scored_tokens[:, 0] = False
    at = positions(scored_tokens)  # found on the host, as data.to_device finds them
    return {"log-probs": ((seq, attn), dict(logits_from=at - 1, targets=seq.flatten()[at])),  # the position before predicts
            "hidden states": ((seq, attn), dict(hidden=True))}


def graph_breaks(model, args, kwargs, aligned, planned=False):
    """torch._dynamo.explain of model(*args, **kwargs) on aligned or packed rows, under the dynamo
    settings training.compiled uses -> (graphs, [each break's reason and place, in one line]).
    planned: with the rows' plan made on the host, as data.to_device makes it for every stage's batch."""
    saved = packing.ALIGN
    packing.ALIGN = aligned
    torch._dynamo.reset()
    try:
        if planned:
            kwargs = {**kwargs, "plan": packing.plan(args[1])}
        with torch._dynamo.config.patch(**DYNAMO):
            out = torch._dynamo.explain(model)(*args, **kwargs)
    finally:
        packing.ALIGN = saved
    places = lambda r: " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(r.user_stack))
    first = lambda reason: next((line.strip() for line in reason.splitlines() if "Explanation" in line),
                                reason.splitlines()[0])[:110]
    return out.graph_count, [f"{first(r.reason)} ({places(r)})" for r in out.break_reasons]


def bench_graphs(model, cfg):
    """Graphs per training forward at cfg's shape with two layers, for a batch of 8 rows and one of 64
    (whose positions outnumber one chunk of logits: model.scored_logps)."""
    small = type(model)(dataclasses.replace(cfg, n_layer=2))
    chunk = max(1, LOGIT_CHUNK_BYTES // (4 * cfg.vocab_size))
    for rows in (8, 64):
        batch = training_batch(cfg.vocab_size, rows)
        B, T = batch["input_ids"].shape
        for name, (args, kwargs) in forwards(small, batch).items():
            for aligned, planned in ((True, True), (True, False), (False, True), (False, False)):
                graphs, breaks = graph_breaks(small, args, kwargs, aligned, planned)
                path = ("aligned (CUDA)" if aligned else "packed (CPU)") + (", planned on the host" if planned else "")
                print(f"graphs {graphs:3d} per {name} forward, {path}, batch {B} x {T} (one chunk of logits: "
                      f"{chunk} positions)")
                for reason in breaks:
                    print(f"    break: {reason}")


class OpCount(TorchDispatchMode):
    """Counts the aten ops run inside: on a GPU each is a kernel launch, what bounds small-batch sampling."""
    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def bench_ops(model, cfg, a, dtype):
    """aten ops per new token of sampling, prompts without padding and left-padded (as PPO samples):
    the count of 16 new tokens less that of 8, over 8."""
    prompt = torch.randint(0, cfg.vocab_size, (2, 8), device=a.device)
    padded = torch.ones_like(prompt)
    padded[0, :3] = 0
    for mask, what in ((torch.ones_like(prompt), "no padding"), (padded, "left-padded")):
        counts = []
        for n in (8, 16):
            with OpCount() as count, autocast(a.device, dtype):
                generate(model.eval(), prompt, mask, n, generator=torch.Generator(a.device).manual_seed(0))
            counts.append(count.ops)
        print(f"sampling ops   {(counts[1] - counts[0]) / 8:12,.0f} aten ops per new token (batch 2, prompt 8, {what})")


def profile(fn, device, label, calls=2):
    """`calls` more calls of fn (a figure, timed already) under torch.profiler: the ops by their own
    time on the device (on the CPU without one), printed beside the wall time and the time the
    device (or the CPU) was busy; a device busy for much less than the wall waits on the host."""
    cuda, acts = torch.device(device).type == "cuda", torch.profiler.ProfilerActivity
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[acts.CPU] + [acts.CUDA] * cuda) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    wall, rows = time.perf_counter() - t0, prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of {label}: {calls} calls, {wall:.3f} s wall, busy {busy_seconds(rows, cuda):.3f} s on the "
          f"{'device' if cuda else 'CPU'}\n{rows.table(sort_by=key, row_limit=15)}")


def busy_seconds(rows, cuda):
    """The seconds of work in a profile's rows (key_averages): on CUDA the kernels' own rows alone (an
    op's row carries its kernels' time too, and a user annotation spans others), as torch's table
    footer counts; on the CPU the ops' own time."""
    if not cuda:
        return rows.self_cpu_time_total / 1e6
    kernels = [e for e in rows if e.device_type != torch.autograd.DeviceType.CPU
               and not getattr(e, "is_user_annotation", False)]  # getattr: an older torch has no such attribute
    return sum(e.self_device_time_total for e in kernels) / 1e6
