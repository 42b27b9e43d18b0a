"""Training plumbing shared by every stage: precision, the learning-rate schedule, the guarded
optimizer step, and step states that let a killed stage resume where it was."""
import contextlib
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import CheckpointError, atomic_write, load_weights, write_text


# ----------------------------------------------------------------------------- precision and steps

COMPILE = False  # train.py --compile sets it: the training forward passes go through torch.compile


def compiled(model):
    """The model itself, or a torch.compile'd view of it sharing its parameters (with --compile).

    dynamic=True: batches are padded to different lengths, and a recompile per shape would cost
    more than it saves.
    """
    return torch.compile(model, dynamic=True) if COMPILE else model


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_dtype(device):
    """bf16 on a GPU that supports it, fp32 on the CPU."""
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device, dtype):
    """Mixed precision for forward passes; the weights stay float32 (the master copy)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def grad_scaler(device, dtype):
    """fp16 needs loss scaling; it skips a step whose gradients overflowed. None otherwise."""
    if dtype != "fp16":
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(torch.device(device).type)
    return torch.cuda.amp.GradScaler()


def cosine_lr(step, steps, warmup, lr, final=0.1):
    """Linear warmup, then cosine decay to final * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


class NonFiniteError(RuntimeError):
    pass


def optimizer_step(loss, optimizer, grad_clip, scaler=None, step=0):
    """Backward, clip, step, zero. Returns the gradient norm before clipping.

    A non-finite loss, or a non-finite gradient without fp16 loss scaling (where it is an
    expected overflow and the scaler skips the step), stops training rather than spreading NaN.
    """
    if not torch.isfinite(loss):
        raise NonFiniteError(f"step {step}: the loss is {loss.item()} (learning rate too high?"
                             " with --dtype fp16, an overflow?)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the gradients overflowed
        scaler.update()
    elif not torch.isfinite(norm):
        raise NonFiniteError(f"step {step}: the gradient norm is {norm.item()} "
                             "(learning rate too high?)")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- resuming inside a stage

class StepState:
    """Resume inside a stage. Every `every` steps: the weights, the optimizer states, the RNG
    states, the step and `extra` (JSON), in one safetensors file renamed into place, no pickle.

        state = StepState(folder, every, steps, {"model": model}, {"opt": opt}, [generator])
        start, extra = state.restore()          # 0, {} on a fresh start
        for step in range(start, steps):
            ...
            state.save(step + 1, extra)         # when step + 1 is a multiple of every, before the end
    The run folder's Runner deletes the file once the stage is complete.
    """

    def __init__(self, folder, every, steps, modules, optimizers, generators=()):
        self.path = os.path.join(folder, "step_state.safetensors")
        self.every, self.steps = every, steps
        self.modules, self.optimizers, self.generators = modules, optimizers, generators

    def save(self, step, extra=None):
        if not self.every or step % self.every or step >= self.steps:
            return
        tensors = {f"{n}.{k}": v.detach().contiguous().cpu() for n, m in self.modules.items()
                   for k, v in m.state_dict().items() if not k.endswith("lm_head.weight")}  # tied
        meta = {"step": step, "extra": extra or {}, "optimizers": {}}
        for n, opt in self.optimizers.items():
            sd = opt.state_dict()
            for pid, st in sd["state"].items():
                tensors.update({f"opt.{n}.{pid}.{k}": v.contiguous().cpu() for k, v in st.items()})
            meta["optimizers"][n] = sd["param_groups"]
        tensors["rng.cpu"] = torch.get_rng_state()
        for i, g in enumerate(self.generators):
            tensors[f"rng.g{i}"] = g.get_state().cpu()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        atomic_write(self.path, lambda p: save_file(tensors, p, metadata={"json": json.dumps(meta)}))

    def restore(self):
        """Load the last saved step into the modules, optimizers and generators: (step, extra)."""
        if not os.path.exists(self.path):
            return 0, {}
        tensors = load_weights(self.path)  # a damaged file: a CheckpointError naming it
        with safe_open(self.path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
        if "step" not in meta:
            raise CheckpointError(f"{self.path}: not a step state (no step in its metadata); delete it to start over")
        print(f"resuming from step {meta['step']}: {self.path}", flush=True)
        for n, m in self.modules.items():
            state = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
            missing, unexpected = m.load_state_dict(state, strict=False)
            if [k for k in missing if not k.endswith("lm_head.weight")] or unexpected:
                raise CheckpointError(f"{self.path}: does not match the {n} being trained; delete it to start over")
        for n, opt in self.optimizers.items():
            state = {}
            for k, v in tensors.items():
                if k.startswith(f"opt.{n}."):
                    pid, key = k[len(f"opt.{n}."):].split(".", 1)
                    state.setdefault(int(pid), {})[key] = v
            opt.load_state_dict({"state": state, "param_groups": meta["optimizers"][n]})
        torch.set_rng_state(tensors["rng.cpu"])
        for i, g in enumerate(self.generators):
            g.set_state(tensors[f"rng.g{i}"])
        cuda_states = [tensors[f"rng.cuda{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
        return meta["step"], meta["extra"]


def truncate_jsonl(path, key, below):
    """Keep the rows of a metrics file whose `key` is below `below` (the steps before a resume)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)[key] < below]
    write_text(path, "".join(rows))
