"""This project's checkpoint folders, through safetensors only (never pickle): model.safetensors
(or, for a stage on a frozen base, adapter.safetensors) and config.json; and the step states a
killed stage resumes from. Hugging Face folders, both ways, are in plumbing/hf.py.
"""
import hashlib
import json
import os
import time
from dataclasses import asdict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from plumbing import distributed

from plumbing.files import DataError, UserError, atomic_write, read_json, write_text
from llama import Llama, LlamaConfig, rope_frequencies, rope_scaling_problem
from lora import LoRALinear, adapters, hold, holding
from model import GPT, GPTConfig, ScalarModel, new_head


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded: the message names the file and the key."""


ARCHS = {"gpt": (GPTConfig, GPT), "llama": (LlamaConfig, Llama)}  # config.json's "arch": the backbone


def save_checkpoint(model, folder, base=None, **extra):
    """model.safetensors + config.json. extra (e.g. a reward offset) goes into config.json.

    A model with adapters (lora.py) on a frozen base that is the folder `base` as loaded (cast to
    the dtype it is held in) keeps its trained weights alone, adapter.safetensors (the adapters and
    a scalar model's head), and config.json says where its base is: a stage on a 1.5B model then
    writes megabytes, not gigabytes. Without `base` (SFT's adapters on --init, a folder outside the
    run) its adapters are stored as held ones beside the base's weights, never merged into them:
    in bf16 that would round most of a small update away (lora.LoRALinear)."""
    os.makedirs(folder, exist_ok=True)
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    arch = "llama" if isinstance(model.config, LlamaConfig) else "gpt"
    config = {"kind": kind, "arch": arch, "model": asdict(model.config), **extra}
    if base is not None and adapters(model):
        names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.lora_A is not None]
        first = adapters(model)[0]
        config["adapter"] = {"base": os.path.relpath(base, folder), "base_sha256": file_sha256(base),
                             "base_dtype": str(first.base.weight.dtype).removeprefix("torch."),
                             "rank": first.lora_A.shape[0], "alpha": first.alpha, "modules": names}
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if ".lora_" in k or k.startswith("head.")}
        file = ADAPTER_FILE
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in held_state(model).items()
                 if not k.endswith("lm_head.weight")}  # tied to wte: stored once
        file = "model.safetensors"
    atomic_write(os.path.join(folder, file), lambda p: save_file(state, p))
    write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2))


ADAPTER_FILE = "adapter.safetensors"  # an adapter folder's weights: the adapters and a scalar model's head


def held_state(model):
    """model's state dict with each adapter as a held one (held.N.A and .B), the model unchanged."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.lora_A is not None:
            del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            state[f"{name}.held.{len(m.held)}.A"], state[f"{name}.held.{len(m.held)}.B"] = m.as_held()
    return state


def adapter_info(folder):
    """config.json's "adapter" entry of an adapter folder (save_checkpoint), or None."""
    path = os.path.join(folder, "config.json")
    return read_config_json(path).get("adapter") if os.path.isfile(path) else None


def load_adapted(folder, info, kind, device):
    """An adapter folder's model: its base folder loaded (recursively: stage 2's base is stage 1's
    adapter folder), cast to the dtype the base was held in, the adapters put back and held
    (lora.hold), never merged: the model computes what the stage's trained model computed."""
    a = info["adapter"]
    base = os.path.normpath(os.path.join(folder, a["base"]))
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise CheckpointError(f"{folder}/config.json: its base folder {base} is missing (an adapter folder "
                              "is read beside the stage folder it was trained on)")
    if file_sha256(base) != a["base_sha256"]:
        raise CheckpointError(f"{folder}: its base folder {base} has changed since the adapter was trained on it")
    model, _ = load_checkpoint(base, kind=kind, device=device, dtype=getattr(torch, a["base_dtype"]))
    rename = lambda k: k if kind == info["kind"] else k.removeprefix("gpt.") if kind == "gpt" else "gpt." + k
    if hasattr(model, "head"):
        model.head.float()
    with torch.random.fork_rng(devices=[]):  # the adapters' initialisation draws nothing from the run's stream
        for name in map(rename, a["modules"]):
            parent, _, child = name.rpartition(".")
            m = model.get_submodule(name)
            if isinstance(m, LoRALinear):  # the base folder's held adapters: this one goes on top
                m.add(a["rank"], a["alpha"])
            else:
                setattr(model.get_submodule(parent), child, LoRALinear(m, a["rank"], a["alpha"]))
    path = os.path.join(folder, ADAPTER_FILE)
    state = {rename(k): v for k, v in load_weights(path, device).items() if kind == info["kind"] or not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" in k or (k.startswith("head.") and kind == info["kind"])]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match config.json's adapter (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return hold(model)


def file_sha256(folder):
    """The content hash of a checkpoint folder's weights (model.safetensors, or the shards of a
    sharded Hugging Face folder one after the other): what a stage's fingerprint records."""
    h = hashlib.sha256()
    adapter = adapter_info(folder)
    if adapter:  # an adapter folder: its base's hash, then its own weights
        h.update(adapter["base_sha256"].encode())
    for path in [os.path.join(folder, ADAPTER_FILE)] if adapter else weight_files(folder):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def read_config_json(path):
    """A config.json as a dict; a missing file or bad JSON raises CheckpointError naming it."""
    try:
        info = read_json(path)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, not {type(info).__name__}")
    return info


def read_checkpoint_config(folder):
    path = os.path.join(folder, "config.json")
    info = read_config_json(path)
    for key, kind in (("kind", str), ("model", dict)):
        if not isinstance(info.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    return info


def check_config(config, path):
    """Shapes a GPT (or a Llama) can be built from, or a CheckpointError naming the config file and
    the field."""
    llama = isinstance(config, LlamaConfig)
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                *(("n_kv_head", "head_dim", "intermediate_size") if llama else ())):
        value = getattr(config, key)
        if type(value) is not int or value <= 0:
            raise CheckpointError(f"{path}: field {key!r} must be a positive integer, not {value!r}")
    if not llama and config.n_embd % config.n_head:
        raise CheckpointError(f"{path}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    if llama and config.n_head % config.n_kv_head:
        raise CheckpointError(f"{path}: n_head {config.n_head} is not a multiple of n_kv_head {config.n_kv_head}")
    if llama and config.head_dim % 2:
        raise CheckpointError(f"{path}: head_dim {config.head_dim} is odd: rotary embeddings turn pairs of channels")
    if llama and rope_scaling_problem(config.rope_scaling):
        raise CheckpointError(f"{path}: {rope_scaling_problem(config.rope_scaling)}")
    return config


def empty(make):
    """make(), a model, built on the meta device: its shapes alone, no memory and no random
    initialisation, since its weights come from a file next (assign)."""
    with torch.device("meta"):
        return make()


def assign(model, state, strict=True):
    """An empty model (empty) takes the tensors of `state` as its own, where they are (on the device,
    in their dtype: no copy), then gets what a file does not hold: a GPT's output embedding, tied
    to its input embedding again (assign gives each name a parameter of its own), and a Llama's
    RoPE frequencies (a buffer computed, not stored). -> load_state_dict's (missing, unexpected)."""
    result = model.load_state_dict(state, strict=strict, assign=True)
    for m in model.modules():
        if isinstance(m, GPT):
            m.lm_head.weight = m.transformer.wte.weight  # tied input and output embeddings
        if isinstance(m, Llama):
            m.inv_freq = rope_frequencies(m.config).to(m.model.embed_tokens.weight.device)
    return result


def load_weights(path, device="cpu", dtype=None):
    """A safetensors file's tensors, on `device`, read one at a time; with dtype, each floating-point
    tensor is cast as it is read, so that a model held in bf16 never holds its float32 file whole
    (the peak is the bf16 model and one tensor as stored)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {k: cast(f.get_tensor(k), dtype, f"{path}: tensor {k!r}") for k in f.keys()}
    except SafetensorError as e:  # safetensors' own error (a damaged file), on one line
        raise CheckpointError(f"{path}: not a safetensors file ({(str(e).splitlines() or ['?'])[0]})") from None


def cast(tensor, dtype, name):
    """A floating-point tensor in dtype (None: as it is); other tensors (token ids, states) as they are.
    A finite weight beyond fp16's range (65504) would become inf: named, as --dtype's doing."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    if dtype == torch.float16 and bool(out.isinf().any()) and not bool(tensor.isinf().any()):
        raise CheckpointError(f"{name} holds values beyond fp16's range (65504): use --dtype bf16")
    return out


def check_finite(state, path):
    """Weights with a NaN or an infinity would surface only as SFT's first loss: name them now."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key!r} holds non-finite values (NaN or inf)")
    return state


def load_checkpoint(folder, kind=None, device="cpu", dtype=torch.float32):
    """Load a folder written by save_checkpoint. kind="scalar" from a "gpt" folder gives a
    scalar model whose backbone is that GPT (the reward model starts from SFT); kind="gpt" from
    a "scalar" folder gives its backbone. Weights only ever come through safetensors, in dtype:
    float32, the master copy a stage trains, or the dtype a frozen model or base is held in
    (training.Memory.held), each tensor cast as it is read; None: as stored."""
    info = read_checkpoint_config(folder)
    arch = info.get("arch", "gpt")  # folders written before the Llama layout have no arch: GPT
    if arch not in ARCHS:
        raise CheckpointError(f"{folder}/config.json: field 'arch' is {arch!r}, not one of {', '.join(ARCHS)}")
    Config, Backbone = ARCHS[arch]
    try:
        config = check_config(Config(**info["model"]), f"{folder}/config.json")
    except TypeError as e:
        raise CheckpointError(f"{folder}/config.json: field 'model': {e}") from None
    kind = kind or info["kind"]
    if "adapter" in info:
        return load_adapted(folder, info, kind, device).to(device, dtype), info
    path = os.path.join(folder, "model.safetensors")
    state = check_finite(load_weights(path, device, dtype), path)  # straight onto the device, in dtype
    if info["kind"] == "scalar" and kind == "gpt":
        state = {k[len("gpt."):]: v for k, v in state.items() if k.startswith("gpt.")}
    model = empty(lambda: ScalarModel(config, Backbone) if kind == "scalar" else Backbone(config))
    if info["kind"] == "gpt" and kind == "scalar":  # the reward model from SFT: a fresh head, drawn on the CPU
        state = {"gpt." + k: v for k, v in state.items()}
        state.update({"head." + k: v.to(device, dtype) for k, v in new_head(config.n_embd).state_dict().items()})
    holding(model, state)  # the adapters of a stage on --init (save_checkpoint), held as trained
    try:
        missing, unexpected = assign(model, state, strict=False)
    except RuntimeError as e:  # a size mismatch: name the first offending tensor, in one line
        detail = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), str(e))
        raise CheckpointError(f"{folder}/model.safetensors: shapes do not match config.json: {detail}") from None
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: checkpoint does not match its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, info


def weight_files(path):
    """A folder's safetensors files: model.safetensors, or the shards model.safetensors.index.json lists."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single) or not os.path.isfile(index):
        return [single]
    weight_map = read_config_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: field 'weight_map' missing or not an object of file names")
    return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]


# ----------------------------------------------------------------------------- resuming inside a stage

class StepState:
    """Resume inside a stage. Every `every` steps, and once `minutes` have passed since the last
    save (--save-minutes; 0: by the steps alone): the weights, the optimizer states, the RNG states, the fp16 loss
    scalers' states, the step and `extra` (JSON), in one safetensors file renamed into place, no
    pickle. Saving draws no random number, so when it happens leaves training as it is.

        state = StepState(folder, every, steps, {"model": model}, {"opt": opt}, [generator],
                          {"scaler": scaler}, minutes)
        start, extra = state.restore()          # 0, {} on a fresh start
        for step in range(start, steps):
            ...
            state.save(step + 1, extra)         # when step + 1 is a multiple of every, before the end
    The run folder's Runner deletes the file once the stage is complete.
    """

    def __init__(self, folder, every, steps, modules, optimizers, generators=(), scalers=None, minutes=0.0):
        self.path = os.path.join(folder, "step_state.safetensors")
        self.every, self.steps = every, steps
        self.modules, self.optimizers, self.generators = modules, optimizers, generators
        self.scalers = {n: s for n, s in (scalers or {}).items() if s is not None}  # None: no fp16
        self.minutes, self.last = minutes, time.time()
        self.asked = None, False  # (step, due(step)), the last asked

    def due(self, step):
        """Whether step is one to save at: by the step count, or by rank 0's clock (every rank the same).
        Asked twice for one step, the same answer (fit asks before save does, to read its figures first)."""
        if self.asked[0] != step:
            if step >= self.steps:
                due = False  # the stage's end: its checkpoint follows
            elif self.every and step % self.every == 0:
                due = True
            else:
                due = bool(self.minutes) and distributed.broadcast(time.time() - self.last >= 60 * self.minutes)
            self.asked = step, due
        return self.asked[1]

    def save(self, step, extra=None):
        if not self.due(step):
            return
        self.last = time.time()
        tensors = {f"{n}.{k}": v.detach().contiguous().cpu() for n, m in self.modules.items()
                   for k, v in trained_weights(m).items()}
        meta = {"step": step, "extra": extra or {}, "optimizers": {}}
        for n, opt in self.optimizers.items():
            sd = opt.state_dict()
            for pid, st in sd["state"].items():
                tensors.update({f"opt.{n}.{pid}.{k}": v.contiguous().cpu() for k, v in st.items()})
            meta["optimizers"][n] = sd["param_groups"]
        meta["scalers"] = {n: s.state_dict() for n, s in self.scalers.items()}  # the loss scale, its growth tracker
        tensors["rng.cpu"] = torch.get_rng_state()
        for i, g in enumerate(self.generators):  # each rank samples with its own: keep them all
            for r, s in enumerate(distributed.gather([g.get_state().cpu()])):
                tensors[f"rng.g{i}" + (f".rank{r}" if r else "")] = s
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
            if set(state) != set(trained_weights(m)):
                raise CheckpointError(f"{self.path}: does not match the {n} being trained; delete it to start over")
            m.load_state_dict(state, strict=False)
        for n, opt in self.optimizers.items():
            state = {}
            for k, v in tensors.items():
                if k.startswith(f"opt.{n}."):
                    pid, key = k[len(f"opt.{n}."):].split(".", 1)
                    state.setdefault(int(pid), {})[key] = v
            opt.load_state_dict({"state": state, "param_groups": meta["optimizers"][n]})
        for n, scaler in self.scalers.items():
            if meta.get("scalers", {}).get(n):  # {} from a disabled scaler
                scaler.load_state_dict(meta["scalers"][n])
        torch.set_rng_state(tensors["rng.cpu"])
        for i, g in enumerate(self.generators):
            g.set_state(tensors.get(f"rng.g{i}.rank{distributed.rank()}", tensors[f"rng.g{i}"]))
        cuda_states = [tensors[f"rng.cuda{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
        return meta["step"], meta["extra"]


def trained_weights(model):
    """The parameters a stage trains, {name: tensor}: what a step state keeps. The rest is what the
    stage started from, frozen (a reward model's unused vocabulary projection; with LoRA, the whole
    base: a step state then holds the adapters and heads alone)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}
