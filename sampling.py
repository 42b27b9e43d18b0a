"""Sampling responses with a KV cache: the preallocated cache, the decode step of fixed shapes
(replayed as one CUDA graph on CUDA), top-k / top-p filtering, the exponential-race sampler and the
response mask. Every model with GPT's interface (model.GPT, llama.Llama) samples through generate."""
import warnings

import torch

CUDA_GRAPHS = True  # on CUDA, replay the decode step as one CUDA graph; False: run it eagerly there too


class KVCache:
    """Keys and values of every layer, preallocated once: (n_layer, B, H, max_len, head_dim)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        # GPT has a key/value head per query head; llama.Llama's grouped-query attention has fewer
        heads = getattr(config, "n_kv_head", config.n_head)
        head_dim = getattr(config, "head_dim", config.n_embd // config.n_head)
        shape = (config.n_layer, batch_size, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # how many positions the prefill filled
        self.write = None  # a decode step's column, a (1,) tensor: decode_step sets it

    def update(self, layer, k, v):
        if self.write is not None:  # a decode step: written at a column held in a tensor, all keys returned
            self.k[layer].index_copy_(2, self.write, k.to(self.k.dtype))  # as slice assignment casts
            self.v[layer].index_copy_(2, self.write, v.to(self.v.dtype))
            return self.k[layer], self.v[layer]
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


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


def autocast_dtype(device_type):
    """The dtype autocast computes in on this device type ("cuda", "cpu"), or None outside autocast."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4; the older calls below are deprecated there
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


@torch.no_grad()
def generate(model, prompt, prompt_mask=None, max_new_tokens=32, temperature=1.0, top_k=None,
             top_p=None, eos_id=None, pad_id=0, generator=None, check_every=8):
    """Sample responses with a KV cache (temperature 0: greedy).

    prompt (B, P) left-padded token ids, prompt_mask (B, P) 1 on real tokens; eos_id, an id or a
    list of them (a chat model's end of turn and end of sequence), ends a response.
    Returns tokens (B, N) and mask (B, N), N <= max_new_tokens: mask is 1 up to and including
    the first eos, and tokens are pad_id after it. Log-probs are recomputed by a full forward pass
    (response_logprobs), the computation every later use makes.
    """
    B, P = prompt.shape
    device = prompt.device
    if prompt_mask is not None and bool(prompt_mask.all()):
        prompt_mask = None  # no padding: the fused attention path
    dtype = autocast_dtype(device.type) or next(model.parameters()).dtype  # the keys' and values' dtype
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype)
    positions = (prompt_mask.sum(-1, keepdim=True) if prompt_mask is not None
                 else torch.full((B, 1), P, device=device))
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    logits = model(prompt, prompt_mask, cache=cache, logits_from=-1)[:, -1]
    step = decode_step(model, cache, prompt_mask, positions)
    n = max_new_tokens
    for t in range(max_new_tokens):
        if temperature == 0:  # greedy
            next_token = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_token = categorical(probs, generator)
        tokens[:, t] = torch.where(alive, next_token, pad_id)
        if eos_id is not None:
            alive = alive & ~is_stop(next_token, eos_id)
        # the one read of the device, every check_every tokens: has every row ended?
        if t == max_new_tokens - 1 or (eos_id is not None and t % check_every == check_every - 1
                                       and not bool(alive.any())):
            n = t + 1
            break
        if t == 0 and CUDA_GRAPHS and device.type == "cuda":
            logits, step = captured(step, tokens[:, :1], autocast_dtype("cuda"))
        else:
            logits = step(tokens[:, t:t + 1])
    tokens = tokens[:, :n]
    return tokens, response_mask(tokens, eos_id, pad_id)


def decode_step(model, cache, prompt_mask, positions):
    """The step after the prefill, token (B, 1) -> the next position's logits (B, V), every call on
    the same shapes and memory, so that CUDA can capture it (captured). The token's key and value
    are written at a column held in a tensor, and it attends over the whole preallocated cache under
    an additive mask made once: 0 on the prompt's real tokens, -inf on left padding and on columns
    not yet written; each step opens its own column in place. positions (B, 1): the first new
    token's position, one more per step."""
    B, L, P = cache.k.size(1), cache.k.size(3), cache.pos
    bias = torch.zeros(B, 1, 1, L, dtype=cache.k.dtype, device=cache.k.device)
    bias[..., P:] = float("-inf")
    if prompt_mask is not None:
        bias[:, 0, 0, :P].masked_fill_(~prompt_mask.bool(), float("-inf"))
    write, position = torch.tensor([P], device=cache.k.device), positions.clone()
    cache.write = write

    def step(token):
        bias.index_fill_(-1, write, 0.0)  # the new token sees itself
        logits = model(token, bias, position_ids=position, cache=cache)[:, -1]
        write.add_(1)
        position.add_(1)
        return logits
    return step


def captured(step, token, dtype=None):
    """Run step on token (B, 1) and capture it as a CUDA graph -> (its logits, a step that copies its
    token into the graph's input and replays every kernel of the model as one launch): sampling at
    small batches is bound by launches, hundreds per token (bench.py --figures ops). As PyTorch's
    CUDA graphs notes ask, the first run (a real step) warms up on a side stream, autocast (dtype,
    or None) does not cache weight casts while capturing, and input and output keep their memory.
    Where capture fails, the eager step."""
    static = token.clone()
    autocast = lambda: torch.autocast("cuda", dtype, enabled=dtype is not None, cache_enabled=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), autocast():
        first = step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph), autocast():
            logits = step(static)  # recorded, not run: the state advances at each replay
    except RuntimeError as e:
        warnings.warn(f"sampling runs eagerly: capturing the decode step as a CUDA graph failed ({e})")
        return first, step

    def replay(token):
        static.copy_(token)
        graph.replay()
        return logits
    return first, replay


def categorical(probs, generator=None):
    """One sample per row of probs (B, V) -> (B,), by the exponential race: argmax_i p_i / E_i with
    E_i ~ Exp(1) (Gumbel-max), no host-device sync. E = -log U from uniform noise: on the CPU
    about 5x cheaper than torch's exponential_, which took a third of sampling's time."""
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return (probs / -uniform.log()).argmax(-1)


def is_stop(tokens, eos_id):
    """Which tokens end a response: eos_id an id or a list of ids, tokens (...) -> bool (...)."""
    return torch.isin(tokens, torch.tensor(eos_id, device=tokens.device).reshape(-1))


def response_mask(tokens, eos_id, pad_id):
    """1 up to and including the first eos (an id or a list of ids) of each row, 0 after: (B, N) -> (B, N)."""
    if eos_id is None:
        return torch.ones_like(tokens)
    is_eos = is_stop(tokens, eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()
