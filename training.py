"""Training plumbing shared by every stage: precision, the learning-rate schedule, the guarded
optimizer step, the figures read back from the device, and the one loop that SFT, the reward model
and DPO share (fit), which resumes a killed stage from its step state. Run folders: plumbing/runs.py;
progress lines: plumbing/progress.py."""
import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx.experimental._config as shapes

import data
from plumbing import distributed
from plumbing.checkpoint import StepState
from plumbing.checks import setting
from plumbing.progress import progress
from plumbing.files import truncate_jsonl
from lora import LoRAConfig, add_adapters, merge
from model import set_checkpointing
from plumbing import files


# ----------------------------------------------------------------------------- precision and steps

class Runtime(NamedTuple):
    """How the training loops use the machine, from train.py's --compile, --grad-accum and
    --save-minutes. In no stage's fingerprint or seed: they change how a stage runs, not what it
    learns (micro-batches: up to floating-point order).

    compile: the training forward passes go through torch.compile (compiled);
    grad_accum: fit's micro-batches per rank and optimizer step;
    save_minutes: a step state also once this many minutes have passed since the last (StepState)."""
    compile: bool = False
    grad_accum: int = 1
    save_minutes: float = 0.0


# where the scored positions are found on the device (packing.positions' nonzero, a batch without
# data.to_device's), their count is data: traced, not a graph break (bench/figures.py --figures graphs)
DYNAMO = dict(capture_dynamic_output_shape_ops=True)


def compiled(model, use):
    """The model itself, or (use: --compile) a torch.compile'd view of it sharing its parameters.

    dynamic=True: batches are padded to different lengths, and a recompile per shape would cost
    more than it saves. Without duck shaping: two sizes equal by chance in the first batch (packed
    rows and rows; on CUDA, the aligned length and the padded one) would share one symbol, and the
    first batch where they differ would compile the graph again.
    """
    if not use:
        return model
    for name, value in DYNAMO.items():  # read when a forward is traced, not here: set for the process
        setattr(torch._dynamo.config, name, value)
    shapes.use_duck_shape = False
    return torch.compile(model, dynamic=True)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_dtype(device):
    """bf16 on a GPU that supports it, fp32 on the CPU."""
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def float32_matmuls(device, dtype):
    """Under mixed precision on CUDA, the float32 matrix products left (the vocabulary projection,
    the reward and value heads) run on TF32 tensor cores: 10 mantissa bits in, float32 sums out
    (torch.set_float32_matmul_precision "high"), several times faster than true FP32 GEMMs, well
    inside bf16's own error (docs/precision-and-parallel.md). With --dtype fp32, true FP32, as asked.
    Returns the precision set."""
    precision = "high" if torch.device(device).type == "cuda" and dtype != "fp32" else "highest"
    torch.set_float32_matmul_precision(precision)
    return precision


def autocast(device, dtype):
    """Mixed precision for forward passes; the weights stay float32 (the master copy)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


class Memory(NamedTuple):
    """How a run's stages hold their models (docs/running.md, "Fitting the GPU you have"): adapters (lora.py) on the
    stages lora.stages names, activation checkpointing of every trained model, and frozen models
    stored in the compute dtype."""
    lora: LoRAConfig = LoRAConfig()
    checkpointing: bool = False
    dtype: str = "fp32"

    def trained(self, model, stage):
        """The model a stage trains: with adapters, its base frozen and stored in the compute dtype
        (the adapters and a scalar model's head stay float32, the master copy); with
        checkpointing, each block recomputed in the backward pass (model.run_block). Earlier
        stages' adapters stay held under the fresh ones; trained in full, they are merged into the
        float32 master weights (lossless there)."""
        if self.lora.applies(stage):
            add_adapters(model.to(DTYPES[self.dtype]), self.lora)
            if hasattr(model, "head"):  # a scalar model's head is trained: float32, the master copy
                model.head.float()
        else:
            merge(model)
        return set_checkpointing(model, self.checkpointing)

    def held(self, stage=None):
        """The dtype a model's weights are loaded in (checkpoint.load_checkpoint): the compute dtype
        for a frozen model (stage None) and for the frozen base of a stage with adapters, float32
        (the master copy) for the weights a stage trains in full."""
        return DTYPES[self.dtype] if stage is None or self.lora.applies(stage) else torch.float32

    def frozen(self, model):
        """A model that is only read (a reference, a reward model): eval mode, no gradients, stored in
        the compute dtype (under bf16, half the bytes; its log-probs and scores still come from a
        float32 head)."""
        return model.eval().requires_grad_(False).to(DTYPES[self.dtype])


def grad_scaler(device, dtype):
    """fp16 needs loss scaling; it skips a step whose gradients overflowed. None otherwise."""
    if dtype != "fp16":
        return None
    device_type = torch.device(device).type
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3, CUDA and the CPU
        return torch.amp.GradScaler(device_type)
    return torch.cuda.amp.GradScaler() if device_type == "cuda" else None  # torch 2.2: no CPU scaler


def cosine_lr(step, steps, warmup, lr, final=0.1):
    """Linear warmup, then cosine decay to final * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


class NonFiniteError(RuntimeError):
    pass


def non_finite_loss(step, value):
    return NonFiniteError(f"step {step}: the loss is {value} (learning rate too high? with --dtype fp16, an overflow?)")


def non_finite_norm(step, value):
    return NonFiniteError(f"step {step}: the gradient norm is {value} (learning rate too high?)")


def backward(loss, scaler=None, step=0, check=True):
    """loss.backward(), scaled with fp16. A non-finite loss stops training rather than spreading NaN:
    here (a host read), or with check=False at the next read of the figures (Figures.read)."""
    if check and not torch.isfinite(loss):
        raise non_finite_loss(step, loss.item())
    (loss if scaler is None else scaler.scale(loss)).backward()


def optimizer_step(loss, optimizer, grad_clip, scaler=None, step=0, check=True):
    """Backward (loss None: the gradients are accumulated already), clip, step, zero. Returns
    the gradient norm before clipping (a tensor, on the device).

    A non-finite gradient without fp16 loss scaling (where it is an expected overflow and the
    scaler skips the step) stops training rather than spreading NaN: here (a host read), or with
    check=False at the next read of the figures, which then hold the norm (Figures.read).
    """
    if loss is not None:
        backward(loss, scaler, step, check)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the gradients overflowed
        scaler.update()
    elif check and not torch.isfinite(norm):
        raise non_finite_norm(step, norm.item())
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class Figures:
    """Logged figures kept on the device and read back together, every few steps, in one host read
    (on a GPU a read makes the host wait until the device has run everything queued before it). The
    finiteness guard reads with them: a step's losses and its gradient norm, checked in step order
    at the read, so a non-finite step still stops training, named by its step; a step state is
    saved only after a read (fit), so nothing non-finite reaches the disk.

    add(step, parts, norm, loss): parts [(weight, {name: 0-dim tensor or float})], one per
    micro-batch, the figure named `loss` the one checked; norm the step's gradient norm (None: not
    checked, fp16's scaler skips those steps).
    read() yields (step, {name: sum of weight x value over the parts}), the floats .item() would
    give, step by step, raising NonFiniteError at the first non-finite one (after the rows before it)."""

    def __init__(self):
        self.pending = []

    def add(self, step, parts, norm=None, loss="loss"):
        """loss: the name of the figure checked as the step's loss (None: none)."""
        self.pending.append((step, parts, norm, loss))

    def read(self):
        tensors = [v for _, parts, norm, _ in self.pending for v in [*(v for _, f in parts for v in f.values()), norm]
                   if torch.is_tensor(v)]  # in the order the loop below takes them
        values = iter(torch.stack([t.detach().double() for t in tensors]).tolist() if tensors else [])
        read = lambda v: next(values) if torch.is_tensor(v) else v  # float64 holds a float32 or bf16 exactly
        pending, self.pending = self.pending, []
        for step, parts, norm, loss in pending:
            figures = {}
            for weight, f in parts:
                f = {k: read(v) for k, v in f.items()}
                if loss and not math.isfinite(f[loss]):
                    raise non_finite_loss(step, f[loss])
                for k, v in f.items():
                    figures[k] = figures.get(k, 0.0) + v * weight
            norm = read(norm) if norm is not None else 0.0
            if not math.isfinite(norm):
                raise non_finite_norm(step, norm)
            yield step, figures


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- one training loop

READ_EVERY = 10  # fit reads its figures back every READ_EVERY steps (and before a step state, a probe, the end)


def rows_of(batch):
    return len(next(iter(batch.values())))


@dataclass
class FitConfig:
    """What fit() reads: the optimizer settings of SFT, the reward model and DPO. Each stage's config
    subclasses it, adds its own fields (steps or epochs, beta, ...) and declares again the fields
    whose defaults differ; these are the reward model's (two of the three stages train on pairs)."""
    batch_size: int = setting(32, "pairs per step", range="[1, inf)")
    lr: float = setting(3e-4, "peak learning rate", range="(0, inf)")
    warmup: int = setting(10, "warmup steps", range="[0, inf)")
    weight_decay: float = setting(0.0, "AdamW weight decay", range="[0, inf)")
    grad_clip: float = setting(1.0, "gradient norm clip", range="(0, inf)")
    save_every: int = setting(50, "save a resumable step state every N steps (0: by --save-minutes alone)",
                              range="[0, inf)")


def fit(model, examples, collate, step_loss, cfg, steps, folder, seed, device="cpu", dtype="fp32",
        desc="train", show=("loss",), probe=None, probe_every=0, units=rows_of, runtime=Runtime()):
    """The loop of SFT, the reward model and DPO: shuffled batches of `examples`, linear warmup and
    cosine decay, a guarded optimizer step, one metrics.jsonl row per step, a progress bar, and a
    step state every cfg.save_every steps to resume from.

    collate(list of examples) -> batch, a dict of tensors; step_loss(forward, batch) -> (loss,
    row of floats), computed under autocast. `steps` counts optimizer steps, each on exactly
    cfg.batch_size examples (batch_plan), in runtime.grad_accum micro-batches per rank
    (accumulate_gradients, which weighs them by units(batch)). cfg: a FitConfig (or anything with
    its fields). probe(model) -> a row of figures (held-out gold, say) joins the metrics every
    probe_every steps and at the end. Returns the last row. epoch_steps converts epochs to steps.

    No step reads the device back (on a GPU the host would wait): the figures step_loss returns
    may be 0-dim tensors, kept with the loss and the gradient norm and read every READ_EVERY
    steps (Figures), the finiteness guard with them.
    """
    os.makedirs(folder, exist_ok=True)
    if steps and not examples:
        raise StageError(f"{desc}: no examples to train on")
    world, accum = distributed.world_size(), runtime.grad_accum
    if cfg.batch_size < world * accum:  # train.py checks the flags before any work; this guards other callers
        raise StageError(f"{desc}: a batch of {cfg.batch_size} examples cannot feed {world} ranks x {accum} "
                         "micro-batches; raise the batch size or lower --grad-accum")
    plan = batch_plan(len(examples), cfg.batch_size, steps, torch.Generator().manual_seed(seed))
    opt = model.configure_optimizers(cfg.lr, cfg.weight_decay, device_type=torch.device(device).type)
    scaler = grad_scaler(device, dtype)
    state = StepState(folder, cfg.save_every, steps, {"model": model}, {"opt": opt}, scalers={"scaler": scaler},
                      minutes=runtime.save_minutes)
    start, _ = state.restore()
    metrics = os.path.join(folder, "metrics.jsonl")
    truncate_jsonl(metrics, "step", start)
    model.train()
    # DDP(compile(model)), as torch.compile's docs advise: DDP and no_sync stay eager (DDPOptimizer splits at buckets)
    forward = distributed.wrap(compiled(model, runtime.compile))
    bar = progress(steps, desc, start)
    row, figures, lrs = {}, Figures(), {}
    for step in range(start, steps):
        set_lr(opt, cosine_lr(step, steps, cfg.warmup, cfg.lr))
        lrs[step] = opt.param_groups[0]["lr"]
        parts = distributed.chunks(distributed.shard(plan[step]), accum)  # this rank's part, in micro-batches
        batches = [collate([examples[i] for i in part]) for part in parts]
        values = accumulate_gradients(forward, batches, step_loss, units, scaler, step, device, dtype)
        norm = optimizer_step(None, opt, cfg.grad_clip, scaler, step, check=False)
        figures.add(step, values, norm if scaler is None else None)  # fp16: the scaler skips an overflowing step
        probing = probe and ((step + 1) % probe_every == 0 or step + 1 == steps)
        due = state.due(step + 1)  # before the read: a step state is saved only after one
        if probing or due or (step + 1) % READ_EVERY == 0 or step + 1 == steps:
            for s, f in figures.read():  # raises NonFiniteError at the first non-finite step
                row = {"step": s, **distributed.sum_row(f), "lr": lrs.pop(s)}
                if probing and s == step:
                    row.update(timed_probe(probe, model))
                files.append_jsonl(metrics, row)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in show})
        bar.update()
        state.save(step + 1)  # after the read: due(step + 1) answers as above
    bar.close()
    return row


def accumulate_gradients(forward, batches, step_loss, units, scaler, step, device, dtype):
    """One optimizer step's gradient from this rank's micro-batches (host batches from collate).

    Data parallel (plumbing/distributed.py) and with --grad-accum above 1, each rank takes its part of every
    batch and splits it into micro-batches. A micro-batch's loss is weighted by its share of the
    whole batch's units(batch) (rows; SFT: response tokens), so the update is the whole batch's,
    up to floating-point order. units(batch) is read on the host, before the copy; each batch's
    packing is planned on the host (data.to_device). Returns [(weight, {"loss": ..., figures})],
    one per micro-batch, for Figures.add.
    """
    world = distributed.world_size()
    sizes = [units(b) for b in batches]  # on the host, where collate made them
    whole = float(sum(sizes)) if world == 1 else distributed.total(
        torch.tensor(float(sum(sizes)), dtype=torch.float64, device=device)).item()
    no_sync = getattr(forward, "no_sync", contextlib.nullcontext)  # DDP: reduce once, at the last micro-batch
    values = []
    for j, batch in enumerate(batches):
        weight = sizes[j] / whole  # 1 with one rank and one micro-batch
        with (contextlib.nullcontext() if j == len(batches) - 1 else no_sync()):
            with autocast(device, dtype):
                loss, figure = step_loss(forward, data.to_device(batch, device))
            backward(loss * (weight * world), scaler, step, check=False)  # DDP divides the gradient by world
        values.append((weight, {"loss": loss.detach(), **figure}))
    return values


def timed_probe(probe, model):
    """probe(model)'s row and its seconds, which are evaluation, not training (runs.method_costs
    leaves them out); the model goes back to training mode."""
    t0 = time.time()
    row = {**probe(model), "seconds_probe": time.time() - t0}
    model.train()
    return row


def batch_plan(n, batch_size, steps, generator):
    """`steps` batches of exactly batch_size indices into range(n): shuffled passes over the data,
    one after the other as one stream, cut into batches. No batch is short, so one rule serves any
    data size, any number of ranks and micro-batches; a pass's remainder opens the next batch."""
    stream = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(n, generator=generator).tolist()
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def epoch_steps(epochs, n, batch_size):
    """Optimizer steps in `epochs` passes over n examples, whole batches only (at least one)."""
    return max(1, epochs * n // batch_size)


class StageError(files.UserError):
    """A stage the command needs but may not run (not in --stages), or a run folder in use."""
