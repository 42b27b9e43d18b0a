"""The decode step of fixed shapes (sampling.Decoder): the tokens of the loop it replaced, at the
same seed, for both layouts; the same ops on the same shapes at every step; one read of the device
per check_every tokens."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cuda_like import fused_sdpa_layout
from llama import Llama, LlamaConfig
from model import GPT, GPTConfig
from sampling import KVCache, autocast_dtype, categorical, filter_logits, generate, response_mask

V = 97
LAYOUTS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32)),
    "llama-gqa": lambda: Llama(LlamaConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                           intermediate_size=48, qkv_bias=True, tie_word_embeddings=False)),
}
SETTINGS = {"greedy": dict(temperature=0), "sampled": dict(temperature=0.8),
            "top-k-top-p": dict(temperature=1.2, top_k=20, top_p=0.9)}


@torch.no_grad()
def generate_by_slicing(model, prompt, prompt_mask=None, max_new_tokens=32, temperature=1.0, top_k=None,
                        top_p=None, eos_id=None, pad_id=0, generator=None, check_every=8):
    """The sampler before the decode step of fixed shapes: each step attends to the cache sliced to
    the columns filled so far, under a mask sliced and rebuilt per token (shapes grow every token)."""
    B, P = prompt.shape
    if prompt_mask is not None and bool(prompt_mask.all()):
        prompt_mask = None
    dtype = autocast_dtype(prompt.device.type) or next(model.parameters()).dtype
    cache = KVCache(model.config, B, P + max_new_tokens, prompt.device, dtype)
    mask = None
    if prompt_mask is not None:
        mask = torch.ones(B, P + max_new_tokens, dtype=torch.long)
        mask[:, :P] = prompt_mask
    positions = prompt_mask.sum(-1, keepdim=True) if prompt_mask is not None else torch.full((B, 1), P)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    alive = torch.ones(B, dtype=torch.bool)
    logits = model(prompt, prompt_mask, cache=cache, logits_from=-1)[:, -1]
    n = max_new_tokens
    for t in range(max_new_tokens):
        if temperature == 0:
            next_token = logits.argmax(-1)
        else:
            next_token = categorical(filter_logits(logits / temperature, top_k, top_p).softmax(-1), generator)
        tokens[:, t] = torch.where(alive, next_token, pad_id)
        if eos_id is not None:
            alive = alive & (next_token != eos_id)
        if t == max_new_tokens - 1 or (eos_id is not None and t % check_every == check_every - 1
                                       and not bool(alive.any())):
            n = t + 1
            break
        step_mask = None if mask is None else mask[:, :P + t + 1]
        logits = model(tokens[:, t:t + 1], step_mask, position_ids=positions + t, cache=cache)[:, -1]
    tokens = tokens[:, :n]
    return tokens, response_mask(tokens, eos_id, pad_id)


def left_padded_prompts(B=6, P=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, V, (B, P), generator=g)
    mask = torch.ones_like(prompt)
    for b, pad in enumerate([0, 3, 1, 5, 0, 2][:B]):
        mask[b, :pad] = 0
        prompt[b, :pad] = 0
    return prompt, mask


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_the_fixed_shape_decode_step_gives_the_slicing_samplers_tokens(layout, setting, padded):
    torch.manual_seed(0)
    # in float64 (tolerance.py): the fixed-shape and sliced steps sum over other numbers of keys, and in
    # float32 a draw at a boundary of the sampler could take another token
    model = LAYOUTS[layout]().eval().double()
    prompt, mask = left_padded_prompts()
    mask = mask if padded else None
    for eos_id in (None, 5):
        kw = dict(max_new_tokens=20, eos_id=eos_id, check_every=4, **SETTINGS[setting])
        ours = generate(model, prompt, mask, generator=torch.Generator().manual_seed(1), **kw)
        before = generate_by_slicing(model, prompt, mask, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(ours[0], before[0]) and torch.equal(ours[1], before[1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_sampling_on_cudas_fused_attention_layout_gives_the_same_tokens(layout, padded):
    """SDPA's output in the layout of CUDA's fused kernels (tests/cuda_like.py): the prefill and every
    decode step (a mask: grouped-query attention's masked path) give the contiguous output's tokens."""
    torch.manual_seed(0)
    model = LAYOUTS[layout]().eval()
    prompt, mask = left_padded_prompts()
    mask = mask if padded else None
    plain = generate(model, prompt, mask, 12, temperature=0.8, generator=torch.Generator().manual_seed(1))
    with fused_sdpa_layout() as calls:
        fused = generate(model, prompt, mask, 12, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert len(calls) == 12 * 2  # the prefill and 11 decode steps, 2 layers each, all in the mode
    assert torch.equal(plain[0], fused[0]) and torch.equal(plain[1], fused[1])


def test_eos_ends_sampling_at_the_same_check_as_before():
    """When every row has ended, sampling stops at the next check: the tokens, their mask and their
    count as before (a vocabulary of 5, so that every row draws its eos soon)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval().double()  # as above
    prompt, mask = left_padded_prompts()
    prompt = prompt % 5
    for seed in range(3):
        kw = dict(max_new_tokens=40, eos_id=2, check_every=4)
        ours = generate(model, prompt, mask, generator=torch.Generator().manual_seed(seed), **kw)
        before = generate_by_slicing(model, prompt, mask, generator=torch.Generator().manual_seed(seed), **kw)
        assert ours[0].size(1) < 40 and ours[0].size(1) % 4 == 0  # ended early, at a check
        assert torch.equal(ours[0], before[0]) and torch.equal(ours[1], before[1])


class Trace(TorchDispatchMode):
    """Each aten op run inside, with the shapes of its tensor arguments, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def per_model_call(model, run):
    """The ops of run() cut at each call of model: [ops from one call to the next]."""
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(len(trace.ops)))
    with Trace() as trace:
        run()
    hook.remove()
    cuts = calls + [len(trace.ops)]
    return [trace.ops[a:b] for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_decode_step_runs_the_same_ops_on_the_same_shapes(layout):
    """So a CUDA graph captured at the first step replays every other: the cache, the mask and every
    intermediate keep their shapes (before, they grew by a column per token)."""
    torch.manual_seed(0)
    model = LAYOUTS[layout]().eval()
    prompt, mask = left_padded_prompts()
    steps = per_model_call(model, lambda: generate(model, prompt, mask, 12, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 12  # the prefill, then 11 decode steps (each with the sampling of its token)
    decode = steps[1:-1]  # the last one's sampling ends the loop
    assert all(ops == decode[0] for ops in decode)


def test_the_device_is_read_once_per_check_every_tokens():
    """No host read per token: the prompt's padding read once, then the eos check every check_every."""
    torch.manual_seed(0)
    model = LAYOUTS["llama-gqa"]().eval()
    prompt, mask = left_padded_prompts()
    with Trace() as trace:
        generate(model, prompt, mask, 16, eos_id=V + 1, check_every=4, generator=torch.Generator().manual_seed(0))
    reads = [op for op, _ in trace.ops if "_local_scalar_dense" in op or op.startswith("aten.equal")]
    assert len(reads) == 1 + 3  # prompt_mask.all(); checks after tokens 4, 8, 12 (16 is the last)
