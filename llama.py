"""The Llama layout, a second backbone with GPT's interface (model.GPT), so every stage trains it
unchanged: Llama 3.x, Qwen2 / Qwen2.5, SmolLM2, TinyLlama and other checkpoints of this shape.

What differs from GPT-2, block by block:
- RMSNorm (no mean, no bias) instead of LayerNorm;
- rotary position embeddings (RoPE): q and k are rotated by an angle that grows with the
  position, so attention sees relative positions, and there is no position table;
- a SwiGLU MLP, down(silu(gate(x)) * up(x)), of width intermediate_size;
- grouped-query attention: n_kv_head key/value heads, each shared by n_head / n_kv_head query
  heads (the KV cache stores only those);
- optional biases on q, k, v (Qwen2) and untied input and output embeddings.

Module names follow Hugging Face's LlamaForCausalLM, so its weights load by name
(hf.load_hf_llama); only an untied output matrix has a name of its own (unembed).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import adamw, attention_inputs, float32_or_wider, head_output, projected, run_block
from plumbing.packing import pack


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    block_size: int = 2048  # the longest context (max_position_embeddings); RoPE has no table
    n_layer: int = 16
    n_head: int = 32
    n_embd: int = 2048
    n_kv_head: int = 8  # key/value heads: n_head for plain multi-head attention
    head_dim: int = 0  # 0: n_embd // n_head
    intermediate_size: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or Llama 3's "llama3" fields
    qkv_bias: bool = False  # Qwen2: biases on q, k and v
    o_bias: bool = False  # Llama's attention_bias puts one on the output projection too
    tie_word_embeddings: bool = True
    model_type: str = "llama"  # the Hugging Face layout ("llama" or "qwen2"), kept for export

    def __post_init__(self):
        self.head_dim = self.head_dim or self.n_embd // max(1, self.n_head)


ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling_problem(scaling):
    """What rope_frequencies cannot do with this rope_scaling (None, or a dict), in one line, or None."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_FIELDS:
        return f"rope_scaling type {kind!r} is not supported ({', '.join(ROPE_FIELDS)})"
    for key in ROPE_FIELDS[kind]:
        if type(scaling.get(key)) not in (int, float) or scaling[key] <= 0:
            return f"rope_scaling of type {kind} needs a positive number {key!r}, not {scaling.get(key)!r}"
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return "rope_scaling of type llama3 needs high_freq_factor above low_freq_factor"
    return None


def rope_frequencies(config):
    """The angle per position of each pair of channels, (head_dim / 2,): theta^(-2i / head_dim),
    stretched as the checkpoint's rope_scaling says (a longer context than pretraining saw)."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    scaling = config.rope_scaling or {}
    if rope_scaling_problem(scaling):
        raise ValueError(rope_scaling_problem(scaling))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":  # every position divided by factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths (beyond original / low_freq_factor) are stretched by factor,
        # short ones (below original / high_freq_factor) kept, and the band between interpolated
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        kept = ((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
        return kept * inv_freq + (1 - kept) * inv_freq / factor
    return inv_freq


def rotate(x, cos, sin):
    """RoPE on q or k (B, H, T, D): channel i and i + D/2 form a pair, turned by its angle."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the rms taken in float32 even under autocast."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = float32_or_wider(x)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_head % config.n_kv_head == 0
        H, KV, D = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, H * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, KV * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, KV * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, config.n_embd, bias=config.o_bias)
        self.n_head, self.n_kv_head, self.head_dim = H, KV, D

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # the cache holds the n_kv_head heads only
        y = grouped_attention(q, k, v, mask, causal=cache is None or T > 1)  # as model.CausalSelfAttention
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def grouped_attention(q, k, v, mask, causal=True):
    """Grouped-query attention, q (B, H, T, D) on k, v (B, KV, S, D): key/value head j serves query
    heads j * G ... (j + 1) * G - 1, G = H / KV, and no key or value is copied per query head.
    Without a mask (causal rows): SDPA's enable_gqa, which its flash kernel runs on CUDA. With one
    (a KV cache's padding, packed rows): the G query heads of each key/value head become G times
    as many queries on that head, the mask repeated to match (a boolean (B, 1, G T, S), small).
    causal: whether rows without a mask attend causally (not a decode step's one query on a cache).
    The output (B, H, T, D) may not be contiguous: CUDA's fused kernels return (B, T, H, D) memory."""
    B, H, T, D = q.shape
    KV, S = k.size(1), k.size(2)
    G = H // KV
    if G == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    mask = mask[:, :, None].expand(mask.size(0), 1, G, T, S).reshape(mask.size(0), 1, G * T, S)
    y = F.scaled_dot_product_attention(q.reshape(B, KV, G * T, D), k, v, attn_mask=mask)
    return y.reshape(B, H, T, D)  # a view, or on CUDA's fused layout a copy (tests/cuda_like.py)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        # untied output embeddings: Hugging Face's lm_head.weight. Named otherwise because a step
        # state (training.py) stores a GPT's lm_head.weight once, as the tied wte it is.
        self.unembed = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.checkpointing = False  # model.run_block
        self.apply(self._init_weights)

    def _apply(self, fn, *args, **kwargs):
        """As nn.Module's (.to, .half, .bfloat16, .cuda: every cast and move), but the RoPE frequencies
        stay float32, computed again on the buffer's new device: in bf16, theta^(-2i / d) keeps 8
        bits, and at Qwen's theta (1e6, head dim 64) the angle at position 1,000 is off by up to a
        radian, for the frozen reference and reward model held in bf16 and not for the policy."""
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = rope_frequencies(self.config).to(self.inv_freq.device)
        return self

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """The parameters of the matrix products (the count MFU uses): untied input embeddings are
        a lookup, and are left out as GPT.num_params leaves out its position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - (self.model.embed_tokens.weight.numel() if self.unembed is not None else 0)

    def forward(self, idx, attention_mask=None, position_ids=None, cache=None, hidden=False, logits_from=0,
                targets=None, temperature=1.0, entropy=False, plan=None):
        """As GPT.forward: idx (B, T) -> float32 logits (B, T - logits_from, vocab) (or (N, vocab) at a
        long logits_from's flat positions, or the log-probs of targets there), or the final hidden
        states (B, T, n_embd) with hidden=True; attention_mask (B, S) over past + T."""
        idx, attention_mask, position_ids, unpack = pack(idx, attention_mask, position_ids, cache, plan)
        position_ids, mask = attention_inputs(idx, attention_mask, position_ids, cache)
        angles = position_ids[..., None].float() * self.inv_freq.float()  # (B or 1, T, head_dim / 2), float32
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B or 1, 1, T, head_dim): both channels of a pair
        x = self.model.embed_tokens(idx)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, block in enumerate(self.model.layers):
            x = run_block(self, block, x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += idx.size(1)
        x = unpack(self.model.norm(x))
        if hidden:
            return x
        weight = self.model.embed_tokens.weight if self.unembed is None else self.unembed.weight
        return head_output(projected(x, logits_from), weight, targets, temperature, entropy)  # float32 (model.py)

    def configure_optimizers(self, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"):
        return adamw(self, lr, weight_decay, betas, device_type)
