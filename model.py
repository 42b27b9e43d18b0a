"""GPT policy, scalar heads (reward and value), and the log-probabilities of responses that every
stage shares (SFT loss, DPO, PPO, the evaluation's KL). Sampling with a KV cache: sampling.py.

The parameter layout follows GPT-2 (and nanoGPT), so Hugging Face GPT-2 weights map onto it
with a transpose of the attention and MLP matrices (hf.load_hf_gpt2). llama.py is the
second backbone (Llama and Qwen2 checkpoints), with the same interface as GPT.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plumbing.packing import pack, positions


TORCH_VERSION = tuple(int(x) for x in torch.__version__.split(".")[:2])


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
        # mask=None means plain causal attention: SDPA can take its fused (flash) kernel. A decode step
        # (one query on a cache) is not causal; without a cache, asking T > 1 would make a symbolic
        # bool under torch.compile, and one query on one key is the same either way
        is_causal = mask is None and (cache is None or T > 1)
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


def attention_inputs(idx, attention_mask=None, position_ids=None, cache=None):
    """The positions (B or 1, T) of the T tokens of idx and the attention mask (B, 1, T, S) or None
    (plain causal attention, the fused path), after the cache's past positions."""
    if attention_mask is not None and attention_mask.dim() == 4:  # the caller's own: packed rows, the decode step
        return position_ids, attention_mask
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
    return position_ids, mask


def run_block(model, block, x, *args):
    """One transformer block; with model.checkpointing, while training with autograd on, under
    activation checkpointing: only the block's input is kept, and the backward pass runs it again.
    That keeps one hidden state (B, T, C) per block in place of the dozen or so tensors attention
    and the MLP save (about 15x less at GPT-2's shape), for one more forward pass per step."""
    if model.checkpointing and model.training and torch.is_grad_enabled():
        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


def set_checkpointing(model, on=True):
    """Activation checkpointing per block for a GPT, a Llama or a ScalarModel's backbone."""
    for m in model.modules():
        if hasattr(m, "checkpointing"):
            m.checkpointing = on
    return model


def projected(x, logits_from):
    """The final hidden states (B, T, C) a forward pass projects to the vocabulary: from column
    logits_from on, or at the flat positions (N,) of a long logits_from (b T + t), as (N, C)."""
    return x[:, logits_from:] if isinstance(logits_from, int) else x.flatten(0, 1).index_select(0, logits_from)


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
        self.checkpointing = False  # recompute each block in the backward pass (set_checkpointing)
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

    def forward(self, idx, attention_mask=None, position_ids=None, cache=None, hidden=False, logits_from=0,
                targets=None, temperature=1.0, entropy=False, plan=None):
        """idx (B, T) -> float32 logits (B, T - logits_from, vocab) of the positions logits_from on
        (negative: counted from the end), or the final hidden states (B, T, n_embd) with hidden=True.
        A long (N,) logits_from picks the flat positions b T + t to project: logits (N, vocab);
        with targets (N,), the next tokens there, not logits but their log-probs at `temperature`
        and, with entropy=True, the entropy of each position's distribution: scored_logps.

        attention_mask (B, S) is 1 on real tokens, 0 on padding, over all S = past + T positions.
        Without it the batch has no padding and attention takes the fused causal path. A padded
        batch without a cache runs packed (plumbing/packing.py): the same outputs, fewer positions; plan, its
        packing made on the host (packing.plan), spares reading the mask's sizes back.
        """
        idx, attention_mask, position_ids, unpack = pack(idx, attention_mask, position_ids, cache, plan)
        position_ids, mask = attention_inputs(idx, attention_mask, position_ids, cache)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for i, block in enumerate(self.transformer.h):
            x = run_block(self, block, x, mask, cache, i)
        if cache is not None:
            cache.pos += idx.size(1)
        x = unpack(self.transformer.ln_f(x))
        return x if hidden else head_output(projected(x, logits_from), self.lm_head.weight, targets, temperature, entropy)

    def configure_optimizers(self, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"):
        return adamw(self, lr, weight_decay, betas, device_type)


def adamw(model, lr, weight_decay, betas, device_type):
    """AdamW; weight decay on the matrices only, not on biases, norms or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and id(p) not in embeddings
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for every parameter's update (on the CPU from torch 2.4: 4x faster here)
    fused = device_type == "cuda" or (device_type == "cpu" and TORCH_VERSION >= (2, 4))
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


class ScalarModel(nn.Module):
    """A GPT backbone with a scalar head on its final hidden states: (B, T) -> (B, T).

    Read at the last real token it is the reward model (reward.py); read at every position it
    is the critic V(x, y_<t) (ppo.py). backbone: the class of the body, GPT or llama.Llama.
    """

    def __init__(self, config, backbone=GPT):
        super().__init__()
        self.config = config
        self.gpt = backbone(config)  # named gpt whatever its class: the checkpoints' keys say gpt.*
        if getattr(self.gpt, "unembed", None) is not None:  # a Llama's untied vocabulary projection:
            self.gpt.unembed.requires_grad_(False)  # unused here, so no optimizer state, and DDP expects no gradient
        self.head = new_head(config.n_embd)

    def forward(self, idx, attention_mask=None, plan=None):
        return scalar_head(self.head, self.gpt(idx, attention_mask, hidden=True, plan=plan))

    def configure_optimizers(self, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"):
        opt = self.gpt.configure_optimizers(lr, weight_decay, betas, device_type)
        opt.add_param_group({"params": list(self.head.parameters()), "weight_decay": 0.0})
        return opt


def new_head(n_embd):
    """A fresh scalar head, drawn from the global random stream: weights of std 1 / sqrt(n_embd + 1), bias 0."""
    head = nn.Linear(n_embd, 1)
    nn.init.normal_(head.weight, std=1 / math.sqrt(n_embd + 1))
    nn.init.zeros_(head.bias)
    return head


# ----------------------------------------------------------------------------- the vocabulary projection

def float32_or_wider(t):
    """t in float32, or as it is when wider: a model run in float64 (the tests' exact comparisons)
    stays in float64 end to end."""
    return t if t.dtype == torch.float64 else t.float()


LOGIT_CHUNK_BYTES = 256 * 2**20  # the most memory one chunk of float32 logits takes (scored_logps)


def vocabulary_logits(x, weight):
    """The vocabulary projection x (N, C) -> (N, V), in float32 even under autocast (the body may
    run in bf16): bf16 keeps 8 bits, so a logit of size 16-32 is rounded by up to 1/16, and every
    log-prob of PPO's ratio, its KL penalty and DPO's margin would carry that error (bench/figures.py
    --figures logp measures it). Callers project only the positions whose next token they score
    (logits_from): at a large vocabulary the logits are the largest tensor of a step."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(float32_or_wider(x), float32_or_wider(weight))


def head_output(x, weight, targets=None, temperature=1.0, entropy=False):
    """A forward pass's output from its final hidden states x (..., C): the logits, or with targets
    the log-probs of those tokens (scored_logps)."""
    if targets is None:
        return vocabulary_logits(x, weight)
    return scored_logps(x, weight, targets, temperature, entropy)


def scored_logps(x, weight, targets, temperature=1.0, entropy=False):
    """log pi(y | h) of each target token y (N,) from its hidden state h (N, C), pi = softmax(h W^T /
    temperature) in float32 -> (log-probs (N,), the entropy of pi at each position (N,) with
    entropy=True, detached (PPO logs it), else None).

    The logits are made over chunks of positions whose float32 logits take at most LOGIT_CHUNK_BYTES,
    and with more than one chunk each runs under activation checkpointing: its logits are not kept
    for the backward pass but recomputed there, so the peak is one chunk's logits (256 MiB: 441
    positions at Qwen2.5's vocabulary of 152k), not N x V x 4 bytes (4.6 GiB at 32 rows of 250
    response tokens). The tiny preset's steps fit in one chunk: the plain path, nothing recomputed.
    """
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * weight.size(0)))
    if x.size(0) <= rows:
        return chunk_logps(x, weight, targets, temperature, entropy)
    parts = [checkpoint(chunk_logps, x[i:i + rows], weight, targets[i:i + rows], temperature, entropy,
                        use_reentrant=False) for i in range(0, x.size(0), rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]) if entropy else None


def chunk_logps(x, weight, targets, temperature, entropy):
    """scored_logps on one chunk of positions, the logits made once."""
    logits = vocabulary_logits(x, weight)
    if temperature != 1.0:  # no copy of the logits at temperature 1
        logits = logits / temperature
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    if not entropy:
        return logps, None
    with torch.no_grad():
        log_pi = logits.log_softmax(-1)  # one log-softmax serves pi and log pi
        return logps, -(log_pi.exp() * log_pi).sum(-1)


def scalar_head(head, x):
    """A reward or value head on hidden states (B, T, C) -> (B, T), in float32 even under autocast,
    as the vocabulary projection: bf16 would round a score of 2-4 to a step of 1/64, so reward gaps
    would tie and the easy set's size (--easy-fraction) would no longer be exact."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(*map(float32_or_wider, (x, head.weight, head.bias))).squeeze(-1)


# ----------------------------------------------------------------------------- log-probabilities

def token_logprobs(logits, tokens):
    """log pi(y_t | x, y_<t) of each given token: logits (B, N, V), tokens (B, N) -> (B, N)."""
    logits = float32_or_wider(logits)
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


def spread(values, flat_positions, shape):
    """values (M,) at the flat positions flat_positions (M,), laid out in a tensor of `shape`, 0 elsewhere."""
    out = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    return out.index_copy(0, flat_positions, values).view(shape)


def response_token_logps(model, batch):
    """log pi(y_t | x, y_<t) of each response token of a collated batch: (B, T), 0 off the response.
    One forward pass, projecting to the vocabulary only the positions whose next token is a
    response token. Summed over a row: log pi(y | x) (DPO); averaged over tokens: the SFT loss.
    batch["response_at"] and batch["plan"] (data.to_device), when there, are those flat positions
    and its packing, found on the host."""
    response_at = batch.get("response_at")
    if response_at is None:
        mask = batch["response_mask"].bool().clone()
        mask[:, 0] = False  # the first token of a row has no logits before it
        response_at = positions(mask)
    return logps_at(model, batch["input_ids"], batch["attention_mask"], response_at, plan=batch.get("plan"))[0]


def logps_at(model, seq, attn, flat_positions, temperature=1.0, entropy=False, plan=None):
    """Log-probs of the tokens of seq (B, T) at flat_positions (M,) (positions(mask) of a boolean
    (B, T) mask), laid out as seq (0 elsewhere), and with entropy=True the entropy of the
    distribution each was drawn from (B, T), else None: one forward pass projecting only the
    positions before them (scored_logps). A position in column 0 has none before it: never asked."""
    # logits_from: the position before a token predicts it
    logps, entropies = model(seq, attn, logits_from=flat_positions - 1, targets=seq.flatten()[flat_positions],
                             temperature=temperature, entropy=entropy, plan=plan)
    return (spread(logps, flat_positions, seq.shape),
            None if entropies is None else spread(entropies, flat_positions, seq.shape))


def sft_loss(token_logps, mask):
    """Next-token loss on the response tokens, L = -sum_t log pi(y_t | x, y_<t) / #tokens (scalar):
    token_logps from response_token_logps, mask the batch's response_mask."""
    return -token_logps.sum() / mask[:, 1:].sum()


def response_logprobs(model, seq, attn, prompt_len, temperature=1.0, mask=None, entropy=False, plan=None,
                      response_at=None):
    """Token log-probs (B, N) of the N response tokens of seq = left-padded prompt (prompt_len
    columns) + response, at the sampling temperature (and, with entropy=True, the entropies there,
    else None): one forward pass, the computation of the rollout and of the update. Only positions
    that predict a response token of the response mask (B, N) are projected, log-probs 0 elsewhere
    (PPO's responses are padded to the longest, most of their columns after an eos); without a
    mask, all N columns. plan and response_at: the packing and the flat positions in seq of the
    mask's tokens, found on the host (ppo.py); without them, found here."""
    if response_at is None:
        full = torch.zeros_like(seq, dtype=torch.bool)
        full[:, prompt_len:] = True if mask is None else mask.bool()
        response_at = positions(full)
    logps, entropies = logps_at(model, seq, attn, response_at, temperature, entropy, plan)
    return logps[:, prompt_len:], None if entropies is None else entropies[:, prompt_len:]


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL(pi || pi_ref) estimate from samples of pi; (B, N), (B, N) -> (B, N).

    k1: log pi - log pi_ref (unbiased, can be negative per token; the InstructGPT penalty).
    k3: (r - 1) - log r with r = pi_ref / pi (unbiased, never negative; Schulman 2020, TRL's "k3").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")
