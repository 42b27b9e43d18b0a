"""GPT policy, scalar heads (reward and value), KV-cache sampling, GPT-2 weight import/export.

The parameter layout follows GPT-2 (and nanoGPT), so Hugging Face GPT-2 weights map onto it
with a transpose of the attention and MLP matrices (see load_hf_gpt2).
"""
import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


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


# ----------------------------------------------------------------------------- training helpers

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

def _atomic_replace(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)  # a kill leaves the old file or the new one, never half of one


def save_checkpoint(model, folder, **extra):
    """model.safetensors + config.json. extra (e.g. a reward offset) goes into config.json."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.endswith("lm_head.weight")}  # tied to wte: stored once
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    _atomic_replace(os.path.join(folder, "model.safetensors"), lambda p: save_file(state, p))
    config = {"kind": kind, "model": asdict(model.config), **extra}
    _atomic_replace(os.path.join(folder, "config.json"),
                    lambda p: open(p, "w").write(json.dumps(config, indent=2)))


def read_checkpoint_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def load_checkpoint(folder, kind=None, device="cpu"):
    """Load a folder written by save_checkpoint. kind="scalar" from a "gpt" folder gives a
    scalar model whose backbone is that GPT (the reward model starts from SFT); kind="gpt" from
    a "scalar" folder gives its backbone. Weights only ever come through safetensors."""
    info = read_checkpoint_config(folder)
    config = GPTConfig(**info["model"])
    state = load_file(os.path.join(folder, "model.safetensors"), device=str(device))
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
        raise ValueError(f"{folder}/model.safetensors: shapes do not match config.json: {detail}")
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device), info
