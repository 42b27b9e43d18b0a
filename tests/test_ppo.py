"""PPO's loop as a whole: the old log-probs come from the update's own computation, data-parallel
losses weigh every token of a minibatch alike, and the logged score is the one PPO maximises.
Then the pure functions by hand: GAE, the clipped policy and value losses, token rewards, the EOS
trick, whitening and the KL controllers."""
import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import GPT, GPTConfig, ScalarModel, kl_penalty, response_logprobs
from ppo import (AdaptiveKL, FixedKL, PPOConfig, Rollouts, eos_trick, gae, minibatch_policy_loss,
                 minibatch_value_loss, policy_loss, token_rewards, train_ppo, value_loss, whiten)
from plumbing.tokenizer import Tokenizer
from tolerance import assert_exact, network_atol

CFG = GPTConfig(vocab_size=300, block_size=48, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["\n\nHuman: What colour is the sky?\n\nAssistant: Blue, thanks for asking.",
             "\n\nHuman: How many legs has an ant?\n\nAssistant: Six legs."] * 20
    return Tokenizer.train(texts, CFG.vocab_size)


def models(tokenizer, dtype=torch.float32):
    torch.manual_seed(0)
    config = GPTConfig(**{**CFG.__dict__, "vocab_size": tokenizer.vocab_size})
    policy = GPT(config).to(dtype)
    return policy, copy.deepcopy(policy).eval(), ScalarModel(config).eval().to(dtype), ScalarModel(config).to(dtype)


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


@pytest.mark.parametrize("n, m, sizes", [(10, 4, [3, 3, 2, 2]), (6, 4, [2, 2, 1, 1]), (64, 2, [32, 32]), (5, 5, [1] * 5)])
def test_every_epoch_runs_the_minibatches_asked_for(n, m, sizes):
    """chunk(m) gave 10 rollouts in 4 minibatches as 3, 3, 3, 1 and 6 in 4 as three minibatches."""
    from ppo import minibatch_indices
    parts = minibatch_indices(n, m, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == sizes
    assert sorted(torch.cat(parts).tolist()) == list(range(n))


def test_micro_batches_give_the_minibatches_update(tokenizer, tmp_path):
    """Gradient accumulation over micro-batches of 3 rollouts (minibatches of 6 and 4 rows are cut
    3 + 3 and 3 + 1): the same figures and the same trained policy and critic as whole minibatches,
    to float order; and the first ratio is still exactly 1 (log pi_old on the same micro-batches)."""
    prompts = ["\n\nHuman: What colour is the sky?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    trained = []
    for micro_batch in (0, 3):
        policy, reference, reward_model, critic = models(tokenizer)
        cfg = PPOConfig(iterations=2, rollouts=10, epochs=2, minibatches=2, sample_every=0, save_every=0,
                        micro_batch=micro_batch)
        row = train_ppo(policy, reference, reward_model, critic, tokenizer, prompts, cfg,
                        str(tmp_path / f"ppo-{micro_batch}"), max_new_tokens=12)
        trained.append((row, torch.cat([p.flatten() for p in policy.parameters()]),
                        torch.cat([p.flatten() for p in critic.parameters()])))
    (row, policy, critic), (row_m, policy_m, critic_m) = trained
    assert not torch.allclose(policy, torch.cat([p.flatten() for p in models(tokenizer)[0].parameters()]))  # it trained
    # float32 (PPO's buffers are): the figures from magnitudes (tolerance.py), as the KL and the ratios are
    # differences of log-probs of size log V summed in other orders; the weights within rtol 1e-4 and
    # atol 1e-6, 7 times the 1.5e-7 measured with AVX2 kernels (Adam's steps have no closed bound)
    atol = network_atol(torch.tensor(math.log(tokenizer.vocab_size)), 4 * CFG.n_embd, CFG.n_layer)
    for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "score", "kl"):
        assert row_m[k] == pytest.approx(row[k], rel=1e-4, abs=atol), k
    torch.testing.assert_close(policy_m, policy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(critic_m, critic, rtol=1e-4, atol=1e-6)
    first = run(tokenizer, tmp_path / "lr0", lr=0.0, critic_lr=0.0, micro_batch=3)
    assert first["approx_kl"] == 0.0 and first["clipfrac"] == 0.0


class Rounding(torch.nn.Module):
    """A stand-in for a compiled or DDP-wrapped module whose float rounding differs from the plain
    model's and depends on the batch's size, as kernels chosen by shape do on a GPU."""

    def __init__(self, model, use=False):
        super().__init__()
        self.model = model

    def forward(self, idx, attention_mask=None, **kw):
        out = self.model(idx, attention_mask, **kw)
        rounded = lambda x: x + 1e-3 * idx.size(0) * torch.linspace(0, 1, x.size(-1))
        return (rounded(out[0]), out[1]) if isinstance(out, tuple) else rounded(out)  # log-probs, entropy


def test_the_old_log_probs_come_from_the_updates_own_forward(tokenizer, tmp_path, monkeypatch):
    """log pi_old must come from the module the update runs (compiled, DDP) on the update's
    minibatches; computed by the plain model on the whole batch, the first ratio is off 1."""
    from plumbing import ppo_batches
    monkeypatch.setattr(ppo_batches, "compiled", Rounding)
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
    return seq, attn, P, *(t.double() for t in (mask, advantages, returns, noise))  # exact in float64 (tolerance.py)


def losses_and_gradients(tokenizer, rows, wrap=lambda m: m):
    """The policy and value losses of `rows` of the minibatch, backward; the two gradients, flat."""
    policy, _, _, critic = models(tokenizer, torch.float64)
    seq, attn, P, mask, advantages, returns, noise = (t[rows] if torch.is_tensor(t) else t
                                                      for t in minibatch(tokenizer))
    with torch.no_grad():  # log pi_old near log pi, so that some ratios are clipped and some not
        old = (response_logprobs(policy, seq, attn, P)[0] + 0.1 * noise) * mask
        old_values = critic(seq, attn)[:, P - 1:-1] * mask + 0.05
    cfg = PPOConfig()
    rollouts = Rollouts(seq, attn, P, seq[:, P:], mask, mask.sum(-1), attn, None, 0.0)
    [part] = rollouts.minibatch(torch.arange(len(rows)), 0, "cpu")  # counting every rank's tokens
    policy_forward, critic_forward = wrap(policy), wrap(critic)  # DDP must outlive the backward pass
    response_logprobs(policy_forward, seq, attn, P)  # a forward pass with no backward, as old_logprobs makes
    loss, _ = minibatch_policy_loss(policy_forward, part, old, advantages, cfg, "cpu", "fp32")
    loss.backward()
    loss, _ = minibatch_value_loss(critic_forward, part, old_values, returns, cfg, "cpu", "fp32")
    loss.backward()
    return [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (policy, critic)]


def ddp_worker(rank, port, tokenizer_path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.nn.parallel import DistributedDataParallel
        rows = [0, 1] if rank == 0 else [2, 3]
        grads = losses_and_gradients(Tokenizer.load(tokenizer_path), rows, DistributedDataParallel)
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
        assert_exact(a, b)  # in float64 (tolerance.py): the ranks' gradients are summed in another order
    # the test can tell: the mean of the two ranks' own token means is another gradient
    per_rank = [losses_and_gradients(tokenizer, rows) for rows in ([0, 1], [2, 3])]
    assert not torch.allclose((per_rank[0][0] + per_rank[1][0]) / 2, one[0], rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- GAE, losses and KL control by hand

def prefix_mask(lengths, n):
    return torch.tensor([[1.0] * L + [0.0] * (n - L) for L in lengths], dtype=torch.float64)


def brute_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k} over valid tokens, V = 0 after the last; R = A + V."""
    B, N = rewards.shape
    adv, ret = torch.zeros(B, N, dtype=torch.float64), torch.zeros(B, N, dtype=torch.float64)
    for b, L in enumerate(lengths):
        v = values[b, :L].tolist() + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            adv[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(L - t))
            ret[b, t] = adv[b, t] + v[t]
    return adv, ret


GAE_LENGTHS = [6, 3, 1, 4]


def gae_inputs():
    torch.manual_seed(3)  # padding positions hold garbage on purpose: they must be ignored
    return torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)


def test_gae_matches_brute_force():
    """gae equals the explicit discounted sum of TD errors, for rows of different lengths."""
    rewards, values = gae_inputs()
    mask = prefix_mask(GAE_LENGTHS, 6)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    exp_adv, exp_ret = brute_gae(rewards, values, GAE_LENGTHS, 0.9, 0.8)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)


def test_gae_padding_is_zero():
    """Padding positions get advantage 0 and return 0."""
    rewards, values = gae_inputs()
    mask = prefix_mask(GAE_LENGTHS, 6)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    pad = mask == 0
    assert (adv[pad] == 0).all() and (ret[pad] == 0).all()


def test_gae_undiscounted_returns_are_reward_to_go():
    """With gamma = lam = 1 the returns are suffix sums of the rewards over valid tokens."""
    rewards, values = gae_inputs()
    mask = prefix_mask(GAE_LENGTHS, 6)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, L in enumerate(GAE_LENGTHS):
        for t in range(L):
            assert ret[b, t].item() == pytest.approx(sum(rewards[b, t:L].tolist()), rel=1e-9, abs=1e-12)


def test_policy_loss_on_policy_is_mean_negative_advantage():
    """At ratio 1 the loss is the masked mean of -A; clip fraction and KL are 0."""
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 100.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, clipfrac, kl = policy_loss(lp, lp.clone(), adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5 + 3.0) / 4)
    assert clipfrac.item() == 0.0 and kl.item() == pytest.approx(0.0, abs=1e-7)


# ratio, advantage, does clipping bind (clip = 0.2)
CLIP_CASES = [
    (1.5, 1.0, True),    # above 1 + eps with A > 0: binds
    (0.5, -1.0, True),   # below 1 - eps with A < 0: binds
    (1.5, -1.0, False),  # above 1 + eps with A < 0: the unclipped term is the max
    (0.5, 1.0, False),   # below 1 - eps with A > 0: the unclipped term is the max
    (1.1, 1.0, False),   # inside the clip range
    (0.9, -2.0, False),  # inside the clip range
]


def test_policy_loss_gradient_zero_exactly_where_clipping_binds():
    """d loss / d logprob is 0 where the clip binds and -A ratio / n elsewhere."""
    ratios = torch.tensor([[c[0] for c in CLIP_CASES]], dtype=torch.float64)
    adv = torch.tensor([[c[1] for c in CLIP_CASES]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    lp = (old + ratios.log()).requires_grad_(True)
    loss, _, _ = policy_loss(lp, old, adv, torch.ones_like(adv), clip=0.2)
    loss.backward()
    n = len(CLIP_CASES)
    for i, (ratio, a, binds) in enumerate(CLIP_CASES):
        expected = 0.0 if binds else -a * ratio / n
        assert lp.grad[0, i].item() == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert (lp.grad[0, i].item() == 0.0) == binds


def test_policy_loss_clipfrac_and_approx_kl_hand_values():
    """clip fraction = share of valid tokens with |ratio - 1| > eps; KL = mean(ratio - 1 - log ratio)."""
    ratios = [1.5, 0.5, 1.1, 0.9, 1.25]
    lp = torch.tensor([[math.log(r) for r in ratios] + [3.0]], dtype=torch.float64)
    old = torch.zeros_like(lp)
    mask = torch.tensor([[1.0] * 5 + [0.0]], dtype=torch.float64)  # the last token is padding
    loss, clipfrac, kl = policy_loss(lp, old, torch.ones_like(lp), mask, clip=0.2)
    assert clipfrac.item() == pytest.approx(3 / 5)
    assert kl.item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 5, rel=1e-9)
    # loss with A = 1: mean of max(-r, -clip(r)) = mean of -min(r, clip(r))
    assert loss.item() == pytest.approx(-sum(min(r, min(max(r, 0.8), 1.2)) for r in ratios) / 5)


def test_policy_loss_masked_positions_contribute_nothing():
    """Garbage at masked positions changes neither the loss nor the stats, and gets no gradient."""
    torch.manual_seed(4)
    lp, adv = torch.randn(2, 5), torch.randn(2, 5)
    old = lp + 0.05 * torch.randn(2, 5)  # valid ratios stay inside the clip range
    mask = prefix_mask([5, 2], 5).float()
    lp2, old2, adv2 = lp.clone(), old.clone(), adv.clone()
    lp2[1, 2:], old2[1, 2:], adv2[1, 2:] = 7.0, -3.0, 50.0
    lp2.requires_grad_(True)
    a, b = policy_loss(lp, old, adv, mask, 0.2), policy_loss(lp2, old2, adv2, mask, 0.2)
    for x, y in zip(a, b):
        assert x.item() == pytest.approx(y.item(), rel=1e-6)
    b[0].backward()
    assert (lp2.grad[1, 2:] == 0).all() and (lp2.grad[0] != 0).all()


# value, old value, return, does the clipped term bind (clip_value = 0.2)
VALUE_CASES = [
    (1.1, 1.0, 2.0, False),  # inside the range: both terms equal
    (1.5, 1.0, 2.0, True),   # past the range towards R: the clipped term (1.2 - 2)^2 is the max
    (0.5, 1.0, 0.0, True),   # below the range towards R: the clipped term (0.8 - 0)^2 is the max
    (1.5, 1.0, 0.0, False),  # past the range away from R: the unclipped term is the max
]


def test_value_loss_hand_value_and_gradient():
    """value_loss = 0.5 mean max((V-R)^2, (clip(V)-R)^2); no gradient where the clipped term binds."""
    v = torch.tensor([[c[0] for c in VALUE_CASES]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[c[1] for c in VALUE_CASES]], dtype=torch.float64)
    ret = torch.tensor([[c[2] for c in VALUE_CASES]], dtype=torch.float64)
    loss = value_loss(v, old, ret, torch.ones_like(old), clip_value=0.2)
    terms = []
    for value, o, r, _ in VALUE_CASES:
        clipped = min(max(value, o - 0.2), o + 0.2)
        terms.append(max((value - r) ** 2, (clipped - r) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 4, rel=1e-9)
    loss.backward()
    n = len(VALUE_CASES)
    for i, (value, _, r, binds) in enumerate(VALUE_CASES):
        expected = 0.0 if binds else (value - r) / n
        assert v.grad[0, i].item() == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_value_loss_ignores_masked_positions():
    """A masked position with a huge error adds nothing to the value loss."""
    v = torch.tensor([[1.0, 100.0]])
    loss = value_loss(v, torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, -100.0]]),
                      torch.tensor([[1.0, 0.0]]), clip_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 1.0)


def test_token_rewards_layout():
    """Score at the last valid token, -kl_coef (logp - ref) on every response token, 0 on padding."""
    torch.manual_seed(5)
    lengths, kl_coef = [5, 2, 3], 0.1
    mask = prefix_mask(lengths, 5)
    lp, ref = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    scores = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for b, L in enumerate(lengths):
        for t in range(L):
            expected[b, t] = -kl_coef * (lp[b, t].item() - ref[b, t].item())
        expected[b, L - 1] += scores[b].item()
    got = token_rewards(scores, kl_penalty(lp, ref) * mask, mask, kl_coef)
    torch.testing.assert_close(got, expected)
    assert (got[mask == 0] == 0).all()


def test_eos_trick():
    """Rows without eos among their valid tokens get the penalty; the others keep their score."""
    eos = 2
    tokens = torch.tensor([[5, 2, 0, 0],    # eos inside the response
                           [5, 6, 7, 8],    # cut at the length limit
                           [5, 6, 2, 2],    # eos only on padding: does not count
                           [2, 9, 9, 9]])   # eos first
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    scores, has_eos = eos_trick(torch.tensor([1.0, 2.0, 3.0, 4.0]), tokens, mask, eos, penalty=-2.0)
    assert scores.tolist() == [1.0, -2.0, -2.0, 4.0]
    assert has_eos.tolist() == [True, False, False, True]


def test_whiten_valid_tokens():
    """Over valid tokens: mean 0, (population) variance 1, equal to (x - m) / s; padding is 0."""
    torch.manual_seed(6)
    x = torch.randn(3, 6, dtype=torch.float64) * 3 + 2
    mask = prefix_mask([6, 2, 4], 6)
    w = whiten(x, mask)
    valid = x[mask.bool()].tolist()
    m = sum(valid) / len(valid)
    s = math.sqrt(sum((v - m) ** 2 for v in valid) / len(valid))
    torch.testing.assert_close(w[mask.bool()], torch.tensor([(v - m) / s for v in valid], dtype=torch.float64))
    assert w[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-9)
    assert w[mask.bool()].var(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    assert (w[mask == 0] == 0).all()


@pytest.mark.parametrize("kl, expected_factor", [
    (3.3, 1 + 0.1 * 10 / 100),   # KL above target: up, by error * n / horizon
    (2.7, 1 - 0.1 * 10 / 100),   # KL below target: down
    (300.0, 1 + 0.2 * 10 / 100),  # error capped at +20%
    (0.0, 1 - 0.2 * 10 / 100),    # error capped at -20%
])
def test_adaptive_kl_update(kl, expected_factor):
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""
    ctl = AdaptiveKL(0.1, target=3.0, horizon=100)
    ctl.update(kl, n=10)
    assert ctl.value == pytest.approx(0.1 * expected_factor, rel=1e-12)
    assert (ctl.value > 0.1) == (kl > 3.0)


def test_fixed_kl_never_changes():
    """FixedKL keeps its coefficient whatever KL it sees."""
    ctl = FixedKL(0.05)
    for kl in (0.0, 3.0, 1e6):
        ctl.update(kl, n=64)
    assert ctl.value == 0.05
