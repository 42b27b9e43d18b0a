"""GPT policy, scalar heads (reward and value), KV-cache sampling, GPT-2 weight import/export.

The parameter layout follows GPT-2 (and nanoGPT), so Hugging Face GPT-2 weights map onto it
with a transpose of the attention and MLP matrices (see load_hf_gpt2).
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data import DataError, read_json


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # the context: longest prompt + response
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, mask, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # mask=None means plain causal attention: SDPA can take its fused (flash) kernel
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask, cache=None, layer=0):
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache, layer))
        return x + self.drop(self.mlp(self.ln_2(x)))


class KVCache:
    """Keys and values of every layer, preallocated once: (n_layer, B, H, max_len, head_dim)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # how many positions are filled

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def position_ids_from_mask(attention_mask):
    """Left padding shifts the positions: the first real token is position 0. (B, S) -> (B, S)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_bias(attention_mask, T):
    """Boolean mask (B, 1, T, S) for the last T of S positions: causal, and padding keys hidden.

    Each position may always see itself, so a padding row never attends to nothing (that is NaN).
    """
    S = attention_mask.size(1)
    q = torch.arange(S - T, S, device=attention_mask.device)[:, None]
    k = torch.arange(S, device=attention_mask.device)[None, :]
    allowed = (k <= q)[None] & attention_mask.bool()[:, None, :]
    return (allowed | (k == q)[None])[:, None]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale the residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters without the position embeddings (the count MFU uses)."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, attention_mask=None, position_ids=None, cache=None, hidden=False):
        """idx (B, T) -> logits (B, T, vocab), or the final hidden states (B, T, n_embd) with hidden=True.

        attention_mask (B, S) is 1 on real tokens, 0 on padding, over all S = past + T positions.
        Without it the batch has no padding and attention takes the fused causal path.
        """
        T = idx.size(1)
        past = 0 if cache is None else cache.pos
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=idx.device)[None]
        mask = None
        if attention_mask is not None:
            mask = attention_bias(attention_mask, T)
        elif past > 0 and T > 1:  # the fused causal kernel aligns its triangle to the top left
            mask = attention_bias(torch.ones(idx.size(0), past + T, device=idx.device), T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        return x if hidden else self.lm_head(x)

    def configure_optimizers(self, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW; weight decay on the matrices only, not on biases, norms or embeddings."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.dim() >= 2 and "wte" not in name and "wpe" not in name
            (decay if is_matrix else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


class ScalarModel(nn.Module):
    """A GPT backbone with a scalar head on its final hidden states: (B, T) -> (B, T).

    Read at the last real token it is the reward model (reward.py); read at every position it
    is the critic V(x, y_<t) (ppo.py).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask=None):
        return self.head(self.gpt(idx, attention_mask, hidden=True)).squeeze(-1)

    def configure_optimizers(self, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"):
        opt = self.gpt.configure_optimizers(lr, weight_decay, betas, device_type)
        opt.add_param_group({"params": list(self.head.parameters()), "weight_decay": 0.0})
        return opt


# ----------------------------------------------------------------------------- sampling

def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf the logits outside the top k, and outside the smallest set of mass top_p."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, prompt, prompt_mask=None, max_new_tokens=32, temperature=1.0, top_k=None,
             top_p=None, eos_id=None, pad_id=0, generator=None, check_every=8):
    """Sample responses with a KV cache.

    prompt (B, P) left-padded token ids, prompt_mask (B, P) 1 on real tokens.
    Returns tokens (B, N), logprobs (B, N) and mask (B, N), N <= max_new_tokens: logprobs are
    log pi(y_t | x, y_<t) under the sampling temperature (before top-k/top-p, the distribution
    PPO recomputes); mask is 1 up to and including the first eos, and tokens are pad_id after it.
    """
    B, P = prompt.shape
    device = prompt.device
    if prompt_mask is not None and bool(prompt_mask.all()):
        prompt_mask = None  # no padding: the fused attention path
    dtype = next(model.parameters()).dtype
    if device.type == "cuda" and torch.is_autocast_enabled():
        dtype = torch.get_autocast_gpu_dtype()
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype)
    mask = None
    if prompt_mask is not None:
        mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)
        mask[:, :P] = prompt_mask
    positions = (prompt_mask.sum(-1, keepdim=True) if prompt_mask is not None
                 else torch.full((B, 1), P, device=device))
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    logits = model(prompt, prompt_mask, cache=cache)[:, -1]
    n = max_new_tokens
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        probs = filter_logits(logp, top_k, top_p).softmax(-1)
        # exponential race (Gumbel-max): a categorical sample with no host-device sync
        noise = torch.empty_like(probs).exponential_(generator=generator)
        next_token = (probs / noise).argmax(-1)
        tokens[:, t] = torch.where(alive, next_token, pad_id)
        logprobs[:, t] = logp.gather(-1, next_token[:, None]).squeeze(-1) * alive
        if eos_id is not None:
            alive = alive & (next_token != eos_id)
        if t == max_new_tokens - 1 or (eos_id is not None and t % check_every == check_every - 1
                                       and not bool(alive.any())):
            n = t + 1
            break
        step_mask = None if mask is None else mask[:, :P + t + 1]
        logits = model(tokens[:, t:t + 1], step_mask, position_ids=positions + t, cache=cache)[:, -1]
    tokens, logprobs = tokens[:, :n], logprobs[:, :n]
    return tokens, logprobs, response_mask(tokens, eos_id, pad_id)


def response_mask(tokens, eos_id, pad_id):
    """1 up to and including the first eos of each row, 0 after: (B, N) -> (B, N)."""
    if eos_id is None:
        return torch.ones_like(tokens)
    is_eos = (tokens == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the message names the file and the key."""


def write_text(path, text):
    """A small text file, written under a temporary name and renamed into place."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)  # a kill leaves the old file or the new one, never half of one


def save_checkpoint(model, folder, **extra):
    """model.safetensors + config.json. extra (e.g. a reward offset) goes into config.json."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.endswith("lm_head.weight")}  # tied to wte: stored once
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    atomic_write(os.path.join(folder, "model.safetensors"), lambda p: save_file(state, p))
    config = {"kind": kind, "model": asdict(model.config), **extra}
    write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2))


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
    """Shapes a GPT can be built from, or a CheckpointError naming the config file and the field."""
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = getattr(config, key)
        if type(value) is not int or value <= 0:
            raise CheckpointError(f"{path}: field {key!r} must be a positive integer, not {value!r}")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{path}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    return config


def load_weights(path, device="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors' own error, on one line
        raise CheckpointError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None


def load_checkpoint(folder, kind=None, device="cpu"):
    """Load a folder written by save_checkpoint. kind="scalar" from a "gpt" folder gives a
    scalar model whose backbone is that GPT (the reward model starts from SFT); kind="gpt" from
    a "scalar" folder gives its backbone. Weights only ever come through safetensors."""
    info = read_checkpoint_config(folder)
    try:
        config = check_config(GPTConfig(**info["model"]), f"{folder}/config.json")
    except TypeError as e:
        raise CheckpointError(f"{folder}/config.json: field 'model': {e}") from None
    state = load_weights(os.path.join(folder, "model.safetensors"), device)
    kind = kind or info["kind"]
    if info["kind"] == "scalar" and kind == "gpt":
        state = {k[len("gpt."):]: v for k, v in state.items() if k.startswith("gpt.")}
    model = ScalarModel(config) if kind == "scalar" else GPT(config)
    if info["kind"] == "gpt" and kind == "scalar":
        state = {"gpt." + k: v for k, v in state.items()}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a size mismatch: name the first offending tensor, in one line
        detail = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), str(e))
        raise CheckpointError(f"{folder}/model.safetensors: shapes do not match config.json: {detail}") from None
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: checkpoint does not match its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device), info


# ----------------------------------------------------------------------------- GPT-2 import/export

# Hugging Face GPT-2 stores these as Conv1D, (in, out): the transpose of nn.Linear's (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(path, device="cpu"):
    """A GPT from a Hugging Face GPT-2 folder (config.json + model.safetensors), e.g. gpt2."""
    files = {name: os.path.join(path, name) for name in ("config.json", "model.safetensors")}
    hf = read_config_json(files["config.json"])
    try:
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions") or hf["n_ctx"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           bias=True)  # dropout stays at 0.0, this project's default
    except KeyError as e:
        raise CheckpointError(f"{files['config.json']}: missing field {e}") from None
    check_config(config, files["config.json"])
    # model.py has GPT-2's LayerNorm eps (1e-5) and GELU (tanh approximation, "gelu_new")
    if (abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12
            or hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")):
        raise CheckpointError(f"{files['config.json']}: only layer_norm_epsilon 1e-5 and "
                              "activation_function gelu_new are supported")
    hf_state = load_weights(files["model.safetensors"])
    model = GPT(config)
    state = {}
    for key, ours in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte
        short = key[len("transformer."):]
        if key not in hf_state and short not in hf_state:
            raise CheckpointError(f"{files['model.safetensors']}: missing key {key!r}")
        w = hf_state.get(key, hf_state.get(short))
        w = w.t() if key.endswith(_CONV1D) else w
        if w.shape != ours.shape:
            raise CheckpointError(f"{files['model.safetensors']}: {key!r} has shape {tuple(w.shape)}, "
                             f"config.json needs {tuple(ours.shape)}")
        state[key] = w
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise CheckpointError(f"{files['model.safetensors']}: lm_head.weight is not tied to wte")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)  # buffers such as attn.bias / attn.masked_bias are ignored
    return model.to(device)


def save_hf_gpt2(gpt, path, eos_id=None):
    """Write a GPT as a Hugging Face GPT-2 folder that GPT2LMHeadModel.from_pretrained reads.

    eos_id (default vocab_size - 1, GPT-2's <|endoftext|> slot) becomes bos/eos_token_id.
    """
    c = gpt.config
    if not c.bias:
        raise ValueError("GPT-2 has biases: a model with bias=False cannot be saved as GPT-2")
    os.makedirs(path, exist_ok=True)
    state = {k: (v.t() if k.endswith(_CONV1D) else v).detach().contiguous().cpu()
             for k, v in gpt.state_dict().items() if k != "lm_head.weight"}  # transformers ties it
    eos_id = c.vocab_size - 1 if eos_id is None else eos_id
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_embd": c.n_embd, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new", "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
              "attn_pdrop": c.dropout, "initializer_range": 0.02, "tie_word_embeddings": True,
              "bos_token_id": eos_id, "eos_token_id": eos_id}
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text(os.path.join(path, "config.json"), json.dumps(config, indent=2))
