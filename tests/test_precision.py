"""Sampling paths agree token for token; mixed-precision training on CUDA (skips without a GPU)."""
import pytest
import torch

import training
from model import GPT, GPTConfig, generate
from training import autocast, grad_scaler, optimizer_step

CFG = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@torch.no_grad()
def sample_by_recomputing(model, prompt, n, generator):
    """The plain path: a full forward over the whole prefix per token, the same exponential race."""
    seq = prompt
    for _ in range(n):
        probs = torch.log_softmax(model(seq)[:, -1].float(), -1).softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        seq = torch.cat([seq, (probs / noise).argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.size(1):]


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_sampling_gives_the_plain_paths_tokens(device):
    torch.manual_seed(0)
    model = GPT(CFG).to(device).eval()
    prompt = torch.randint(0, CFG.vocab_size, (8, 10), device=device)
    fast, _ = generate(model, prompt, None, 20, generator=torch.Generator(device).manual_seed(3))
    plain = sample_by_recomputing(model, prompt, 20, torch.Generator(device).manual_seed(3))
    assert torch.equal(fast, plain)


@cuda_only
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_training_lowers_the_loss_on_cuda(dtype):
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    opt = model.configure_optimizers(3e-3, device_type="cuda")
    scaler = grad_scaler("cuda", dtype)
    ids = torch.randint(0, CFG.vocab_size, (16, 32), device="cuda")
    losses = []
    for step in range(30):
        with autocast("cuda", dtype):
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer_step(loss, opt, 1.0, scaler, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert next(model.parameters()).dtype == torch.float32  # master weights stay float32


@cuda_only
def test_compiled_training_forward_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    ids = torch.randint(0, CFG.vocab_size, (4, 32), device="cuda")
    training.COMPILE = True
    try:
        compiled = training.compiled(model)
        assert (compiled(ids) - model(ids)).abs().max() < 1e-4
    finally:
        training.COMPILE = False
