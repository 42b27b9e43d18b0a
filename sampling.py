"""Sampling responses with a KV cache: the preallocated cache, the decode step of fixed shapes
(replayed as one CUDA graph on CUDA, kept for the next call of the same shapes), top-k / top-p
filtering, the exponential-race sampler and the response mask. Every model with GPT's interface
(model.GPT, llama.Llama) samples through generate."""
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA_GRAPHS = True  # on CUDA, replay the decode step as one CUDA graph; False: run it eagerly there too
CACHE_COLUMNS = 64  # on CUDA the KV cache's length is a multiple of this, so that prompts of a stage share a graph
HELD = weakref.WeakKeyDictionary()  # model: its Graphed decode step (held)


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
    L = P + max_new_tokens
    if device.type == "cuda":  # a stage's prompts differ in length: one graph serves 64 lengths
        L = -(-L // CACHE_COLUMNS) * CACHE_COLUMNS
    if graphs_on(device):
        graphed = held(model, B, L, dtype, device)
        forward, decoder = graphed.forward(model), graphed.decoder
        step = lambda token: graphed(model, token)
    else:
        forward, decoder = model, Decoder(model.config, B, L, device, dtype)
        step = lambda token: decoder.step(model, token)
    positions = (prompt_mask.sum(-1, keepdim=True) if prompt_mask is not None
                 else torch.full((B, 1), P, device=device))
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    logits = decoder.prefill(forward, prompt, prompt_mask, positions)
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
        logits = step(tokens[:, t:t + 1])
    tokens = tokens[:, :n]
    return tokens, response_mask(tokens, eos_id, pad_id)


class Decoder:
    """The step after the prefill, token (B, 1) -> the next position's logits (B, V), every call on
    the same shapes and memory, so that CUDA can capture it (Graphed). The token's key and value are
    written into the cache (L columns) at a column held in a tensor, and it attends over the whole
    cache under an additive mask made once per prompt: 0 on the prompt's real tokens, -inf on left
    padding and on columns not yet written; each step opens its own column in place. position
    (B, 1): the next token's position, one more per step. prefill refills all of it in place, so a
    captured step serves the next prompt of the same shapes."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        self.cache = KVCache(config, batch_size, max_len, device, dtype)
        self.bias = torch.empty(batch_size, 1, 1, max_len, dtype=dtype, device=device)
        self.write = torch.empty(1, dtype=torch.long, device=device)
        self.position = torch.empty(batch_size, 1, dtype=torch.long, device=device)

    def prefill(self, forward, prompt, prompt_mask, positions):
        """The prompt (B, P) into the cache's first P columns -> the last position's logits (B, V);
        then the step's mask, column and positions (B, 1), for the first new token."""
        self.cache.pos, self.cache.write = 0, None
        logits = forward(prompt, prompt_mask, cache=self.cache, logits_from=-1)[:, -1]
        P = self.cache.pos
        self.bias.fill_(0.0)
        self.bias[..., P:] = float("-inf")
        if prompt_mask is not None:
            self.bias[:, 0, 0, :P].masked_fill_(~prompt_mask.bool(), float("-inf"))
        self.write.fill_(P)
        self.position.copy_(positions)
        self.cache.write = self.write
        return logits

    def step(self, forward, token):
        self.bias.index_fill_(-1, self.write, 0.0)  # the new token sees itself
        logits = forward(token, self.bias, position_ids=self.position, cache=self.cache)[:, -1]
        self.write.add_(1)
        self.position.add_(1)
        return logits


# ----------------------------------------------------------------------------- CUDA graphs

def graphs_on(device):
    return CUDA_GRAPHS and device.type == "cuda"


def held(model, batch_size, max_len, dtype, device):
    """model's Graphed decode step for these shapes: the one the last call made, where its shapes,
    weights' places and flags are these, else a new one in its place (the old one's memory is freed
    first: one is held per model, for as long as the model lives)."""
    key = (batch_size, max_len, dtype, device, state(model))
    graphed = HELD.get(model)
    if graphed is None or graphed.key != key:
        HELD.pop(model, None)
        graphed = HELD[model] = Graphed(key, Decoder(model.config, batch_size, max_len, device, dtype), device)
    return graphed


def state(model):
    """What a captured step took from model besides its weights' values: each weight and buffer,
    and where it lives (a cast or a load that replaces a tensor moves it), and the flags its forward reads
    (dropout's training, an adapter's enabled: lora.py). A weight updated in place (an optimizer
    step) keeps its place, and the graph reads its new values."""
    places = tuple((id(t), t.data_ptr(), t.dtype) for t in tensors(model).values())
    return places, tuple((m.training, getattr(m, "enabled", None)) for m in model.modules())


class Graphed:
    """A model's decode step at one shape, captured as a CUDA graph at its first step and replayed at
    every later one, of this generate call and of the next calls of the same key (held): a
    capture synchronises the device, and a stage samples the same shapes every iteration.

    Under autocast, a graph captured with autocast's cache off (as it must be) casts every float32
    weight at every replay, 8 bytes per weight per token (read 4, write 2, the product reads 2)
    against 2 for a weight held in bf16: a policy trained in full samples from float32 masters.
    So the weights autocast casts in the first step get copies in its dtype (copies), which the
    graph and the prefill read, refreshed from the masters once per generate call (read 4, write 2
    per weight per call); they cost 2 bytes per such weight for as long as the step is held."""

    def __init__(self, key, decoder, device):
        self.key, self.decoder, self.device = key, decoder, device
        self.copies = {}  # weight name: its copy in autocast's dtype
        self.graph = self.static = self.logits = None
        self.eager = False  # capture failed: every step runs eagerly

    def forward(self, model):
        """model's forward on the copies in place of the weights and buffers they copy, refreshed now."""
        if not self.copies:
            return model
        weights = tensors(model)
        for name, copy in self.copies.items():
            copy.copy_(weights[name])
        return lambda *args, **kwargs: torch.func.functional_call(model, self.copies, args, kwargs,
                                                                  tie_weights=False, strict=False)

    def __call__(self, model, token):
        if self.eager:  # on the weights themselves, autocast caching their casts for the call
            return self.decoder.step(model, token)
        if self.graph is None:
            return self.capture(model, token)
        self.static.copy_(token)
        self.graph.replay()
        return self.logits

    def capture(self, model, token):
        """The first step, for real (logits returned) on a side stream, as PyTorch's notes on CUDA
        graphs ask, and without autocast's cache, recording the weights it casts; then the next
        step recorded, not run, on the copies: the state advances at each replay. Every CUDA call
        names the tensors' device: the current device may be another (--device cuda:1)."""
        dtype = autocast_dtype(self.device.type)
        autocast = lambda: torch.autocast(self.device.type, dtype, enabled=dtype is not None, cache_enabled=False)
        self.static = token.clone()
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), autocast(), Casts(dtype) as casts:
                first = self.decoder.step(model, self.static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.copies = {name: w.detach().to(dtype) for name, w in tensors(model).items() if id(w) in casts.inputs}
            forward = self.forward(model)
            with autocast():
                captured = graph_of(lambda: self.decoder.step(forward, self.static), side)
        if captured is None:
            self.eager, self.copies = True, {}
        else:
            self.graph, self.logits = captured
        return first


def tensors(model):
    """model's weights and buffers by name (an earlier stage's adapter is a buffer: lora.Held)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


class Casts(TorchDispatchMode):
    """The tensors (their id) cast to dtype by the ops run inside: autocast's casts of weights."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype, self.inputs = dtype, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None and func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == self.dtype:
            self.inputs.add(id(args[0]))
        return func(*args, **kwargs)


def graph_of(record, stream):
    """record()'s kernels, captured on stream (of the current device) -> (the CUDA graph, record's
    output), or None where capture fails, leaving the current stream and the caching allocator as
    they were: torch.cuda.graph leaves the capture stream current when capture_end raises, and
    capture_end raises before it ends the allocator's capture into the graph's pool (a later
    out-of-memory retry then fails an internal assert)."""
    graph, pool, device = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle(), torch.cuda.current_device()
    before = torch.cuda.current_stream(device)
    torch.cuda.synchronize(device)
    torch.cuda.set_stream(stream)
    try:
        graph.capture_begin(pool)
        try:
            out = record()
        finally:
            graph.capture_end()
        return graph, out
    except RuntimeError as e:
        end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None) or torch._C._cuda_endAllocateCurrentStreamToPool
        try:
            end_pool(device, pool)
            torch._C._cuda_releasePool(device, pool)  # the graph releases it only after a capture_end that ran
        except RuntimeError:
            pass  # capture_end had ended it
        warnings.warn(f"sampling runs eagerly: capturing the decode step as a CUDA graph failed ({e})")
        return None
    finally:
        torch.cuda.set_stream(before)


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
