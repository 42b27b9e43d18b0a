"""PPO's loop as a whole: the old log-probs come from the update's own computation, data-parallel
losses weigh every token of a minibatch alike, and the logged score is the one PPO maximises.
(The loss math, GAE and whitening by hand: tests/test_losses.py.)"""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
from model import GPT, GPTConfig, ScalarModel, response_logprobs
from ppo import PPOConfig, minibatch_policy_loss, minibatch_value_loss, train_ppo

CFG = GPTConfig(vocab_size=300, block_size=48, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["\n\nHuman: What colour is the sky?\n\nAssistant: Blue, thanks for asking.",
             "\n\nHuman: How many legs has an ant?\n\nAssistant: Six legs."] * 20
    return data.Tokenizer.train(texts, CFG.vocab_size)


def models(tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(**{**CFG.__dict__, "vocab_size": tokenizer.vocab_size})
    policy = GPT(config)
    return policy, copy.deepcopy(policy).eval(), ScalarModel(config).eval(), ScalarModel(config)


def run(tokenizer, tmp_path, dtype="fp32", **cfg):
    policy, reference, reward_model, critic = models(tokenizer)
    cfg = PPOConfig(**{"iterations": 1, "rollouts": 8, "epochs": 1, "minibatches": 2, "sample_every": 0,
                       "save_every": 0, **cfg})
    prompts = ["\n\nHuman: What colour is the sky?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    return train_ppo(policy, reference, reward_model, critic, tokenizer, prompts, cfg, str(tmp_path / "ppo"),
                     max_new_tokens=12, dtype=dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_first_ratio_is_exactly_one(tokenizer, tmp_path, dtype):
    """With the learning rates at 0 the policy never moves, so every minibatch of the first epoch is
    on-policy: approx KL and clip fraction are exactly 0, under bf16 autocast as in float32, since
    log pi_old is computed on the update's minibatches by the update's own forward pass. The
    policy starts equal to its reference, so the KL penalty is exactly 0 too."""
    row = run(tokenizer, tmp_path, dtype, lr=0.0, critic_lr=0.0)
    assert row["approx_kl"] == 0.0 and row["clipfrac"] == 0.0
    assert row["kl"] == 0.0


class Rounding(torch.nn.Module):
    """A stand-in for a compiled or DDP-wrapped module whose float rounding differs from the plain
    model's and depends on the batch's size, as kernels chosen by shape do on a GPU."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, attention_mask=None, **kw):
        out = self.model(idx, attention_mask, **kw)
        return out + 1e-3 * idx.size(0) * torch.linspace(0, 1, out.size(-1))


def test_the_old_log_probs_come_from_the_updates_own_forward(tokenizer, tmp_path, monkeypatch):
    """log pi_old must come from the module the update runs (compiled, DDP) on the update's
    minibatches; computed by the plain model on the whole batch, the first ratio is off 1."""
    import ppo
    monkeypatch.setattr(ppo, "compiled", Rounding)
    row = run(tokenizer, tmp_path, lr=0.0, critic_lr=0.0)
    assert row["approx_kl"] == 0.0 and row["clipfrac"] == 0.0


def test_the_logged_score_is_the_one_ppo_maximises(tokenizer, tmp_path):
    """score: the reward model's score after the EOS trick (what the rewards carry); rm_score: before.
    An untrained policy almost never stops within 2 tokens, so every response gets no_eos_score."""
    policy, reference, reward_model, critic = models(tokenizer)
    cfg = PPOConfig(iterations=1, rollouts=8, epochs=1, minibatches=2, sample_every=0, save_every=0, no_eos_score=-7.0)
    row = train_ppo(policy, reference, reward_model, critic, tokenizer, ["\n\nHuman: Hi\n\nAssistant:"], cfg,
                    str(tmp_path / "ppo"), max_new_tokens=2)
    assert row["eos_fraction"] == 0.0
    assert row["score"] == -7.0 and row["rm_score"] != -7.0


# ----------------------------------------------------------------------------- data parallel weighting

def minibatch(tokenizer):
    """Four rollouts: the first two (rank 0's) with short responses, the last two (rank 1's) long."""
    torch.manual_seed(1)
    B, P, N = 4, 6, 10
    seq = torch.randint(0, tokenizer.vocab_size, (B, P + N))
    mask = torch.zeros(B, N)
    for i, n in enumerate([2, 3, 9, 10]):
        mask[i, :n] = 1
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)
    advantages, returns, noise = (torch.randn(B, N) * mask for _ in range(3))
    return seq, attn, P, mask, advantages, returns, noise


def losses_and_gradients(tokenizer, rows, wrap=lambda m: m):
    """The policy and value losses of `rows` of the minibatch, backward; the two gradients, flat."""
    policy, _, _, critic = models(tokenizer)
    seq, attn, P, mask, advantages, returns, noise = (t[rows] if torch.is_tensor(t) else t
                                                      for t in minibatch(tokenizer))
    with torch.no_grad():  # log pi_old near log pi, so that some ratios are clipped and some not
        old = (response_logprobs(policy, seq, attn, P)[0] + 0.1 * noise) * mask
        old_values = critic(seq, attn)[:, P - 1:-1] * mask + 0.05
    cfg = PPOConfig()
    policy_forward, critic_forward = wrap(policy), wrap(critic)  # DDP must outlive the backward pass
    response_logprobs(policy_forward, seq, attn, P)  # a forward pass with no backward, as old_logprobs makes
    loss, _ = minibatch_policy_loss(policy_forward, seq, attn, P, mask, old, advantages, cfg, "cpu", "fp32")
    loss.backward()
    loss, _ = minibatch_value_loss(critic_forward, seq, attn, P, mask, old_values, returns, cfg, "cpu", "fp32")
    loss.backward()
    return [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (policy, critic)]


def ddp_worker(rank, port, tokenizer_path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.nn.parallel import DistributedDataParallel
        rows = [0, 1] if rank == 0 else [2, 3]
        grads = losses_and_gradients(data.Tokenizer.load(tokenizer_path), rows, DistributedDataParallel)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_weigh_every_token_of_the_minibatch_alike(tokenizer, tmp_path):
    """Two gloo ranks whose responses differ in length give the gradient of one process on the
    union of their rows (a per-rank token mean would weigh rank 0's few tokens more)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, str(tmp_path / "tokenizer.json"), str(tmp_path / "grads.pt")), nprocs=2)
    two = torch.load(tmp_path / "grads.pt")
    one = losses_and_gradients(tokenizer, [0, 1, 2, 3])
    for a, b in zip(two, one):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the test can tell: the mean of the two ranks' own token means is another gradient
    per_rank = [losses_and_gradients(tokenizer, rows) for rows in ([0, 1], [2, 3])]
    assert not torch.allclose((per_rank[0][0] + per_rank[1][0]) / 2, one[0], rtol=1e-3, atol=1e-6)
