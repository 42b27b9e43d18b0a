"""The pure loss functions of model.py, reward.py, dpo.py, ppo.py and mpo.py against hand computations."""
import math

import pytest
import torch

from dpo import dpo_loss
from model import kl_penalty, sequence_logps, sft_loss
from mpo import SplitError, delta_for_fraction, reward_gaps, split_by_gap
from ppo import AdaptiveKL, FixedKL, eos_trick, gae, policy_loss, token_rewards, value_loss, whiten
from reward import bt_loss, last_token_index, rewards_at_last_token


def softplus(x):
    """log(1 + exp(x)) on a python float, stable for any x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def log_sigmoid(x):
    return -softplus(-x)


# ----------------------------------------------------------------------------- reward.py

def test_bt_loss_hand_values():
    """bt_loss is the mean of log(1 + exp(-g)) over the gaps g = chosen - rejected."""
    chosen, rejected = torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.0, 2.0, -0.5])
    gaps = [1.0, -2.0, 0.0]
    expected = sum(math.log(1 + math.exp(-g)) for g in gaps) / len(gaps)
    assert bt_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_bt_loss_equal_rewards_is_log2():
    """Equal rewards: the model is indifferent, the loss is log 2."""
    r = torch.tensor([0.3, -1.7, 5.0])
    assert bt_loss(r, r.clone()).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_bt_loss_finite_for_huge_gaps(gap):
    """A gap of +-1e4 gives a finite, correct loss (no exp overflow)."""
    loss = bt_loss(torch.tensor([gap]), torch.tensor([0.0])).item()
    assert math.isfinite(loss)
    assert loss == pytest.approx(softplus(-gap), rel=1e-3, abs=1e-6)


def test_bt_loss_gradient_direction():
    """Descending the loss raises the chosen reward and lowers the rejected one, by sigmoid(-g)/B."""
    chosen = torch.tensor([0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    bt_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    expected = [-1 / (1 + math.exp(g)) / 2 for g in (0.5, -2.0)]  # d/dc of softplus(-g) / B
    assert chosen.grad.tolist() == pytest.approx(expected, rel=1e-5)
    assert rejected.grad.tolist() == pytest.approx([-e for e in expected], rel=1e-5)


MASKS = torch.tensor([
    [1, 1, 1, 0, 0],  # right-padded
    [0, 0, 1, 1, 1],  # left-padded
    [0, 1, 1, 0, 0],  # padded on both sides
    [1, 1, 1, 1, 1],  # no padding
    [1, 0, 0, 0, 0],  # a single real token at position 0
])


def test_last_token_index_all_paddings():
    """The index is the last position whose mask is 1, for every padding layout."""
    expected = [max(j for j, m in enumerate(row) if m) for row in MASKS.tolist()]
    assert expected == [2, 4, 2, 4, 0]
    assert last_token_index(MASKS).tolist() == expected


def test_rewards_at_last_token_reads_the_right_value():
    """rewards_at_last_token returns values[b, last real token of b]."""
    values = torch.arange(25, dtype=torch.float32).reshape(5, 5) * 10
    expected = [values[0, 2], values[1, 4], values[2, 2], values[3, 4], values[4, 0]]
    assert rewards_at_last_token(values, MASKS).tolist() == [v.item() for v in expected]


# ----------------------------------------------------------------------------- mpo.py

def test_split_by_gap_threshold_is_strict():
    """easy = gap > delta; a gap exactly equal to delta goes to hard."""
    gaps = torch.tensor([0.5, 1.0, 1.5, -2.0, 3.0])
    easy, hard = split_by_gap(gaps, 1.0)
    assert easy == [2, 4]
    assert hard == [0, 1, 3]


def test_split_by_gap_partitions_indices():
    """easy and hard are disjoint and together cover range(N)."""
    torch.manual_seed(0)
    gaps = torch.randn(50)
    easy, hard = split_by_gap(gaps, 0.3)
    assert sorted(easy + hard) == list(range(50))
    assert not set(easy) & set(hard)
    assert all(gaps[i] > 0.3 for i in easy) and all(gaps[i] <= 0.3 for i in hard)


@pytest.mark.parametrize("delta, empty", [(10.0, "easy"), (-5.0, "hard")])
def test_split_by_gap_empty_set_raises(delta, empty):
    """An empty side raises SplitError naming delta, the gap range and --easy-fraction."""
    gaps = torch.tensor([0.5, -2.0, 3.0])
    with pytest.raises(SplitError) as info:
        split_by_gap(gaps, delta)
    msg = str(info.value)
    assert f"delta {delta:g}" in msg and empty in msg
    assert "-2" in msg and "3" in msg  # the gap range
    assert "--easy-fraction" in msg


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_delta_for_fraction_gives_exact_easy_size(fraction):
    """With distinct gaps the easy set is exactly the round(f N) largest gaps."""
    torch.manual_seed(1)
    gaps = torch.randn(20)
    k = round(fraction * 20)
    delta = delta_for_fraction(gaps, fraction)
    easy = set((gaps > delta).nonzero().flatten().tolist())
    top_k = set(sorted(range(20), key=lambda i: -gaps[i].item())[:k])
    assert easy == top_k


def test_reward_gaps_signed_and_abs():
    """gap="signed" is chosen - rejected; gap="abs" its absolute value."""
    c, r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 1.5])
    assert reward_gaps(c, r).tolist() == [-2.0, 0.0, 0.5]
    assert reward_gaps(c, r, gap="abs").tolist() == [2.0, 0.0, 0.5]


# ----------------------------------------------------------------------------- dpo.py

PC, PR, RC, RR = [-1.0, -3.0], [-2.0, -1.5], [-1.5, -2.0], [-1.0, -2.5]  # policy / reference logps


def dpo_args(requires_grad=False):
    return [torch.tensor(x, dtype=torch.float64, requires_grad=requires_grad) for x in (PC, PR, RC, RR)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_hand_values(beta, eps):
    """sigmoid loss = -(1-eps) log sig(beta h) - eps log sig(-beta h), h on python floats."""
    losses, _, _ = dpo_loss(*dpo_args(), beta=beta, label_smoothing=eps)
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_is_log2_at_reference(eps):
    """When the policy equals the reference, h = 0 and the loss is log 2."""
    pc, pr = torch.tensor(PC), torch.tensor(PR)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=eps)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-6)
    assert cr.tolist() == [0.0, 0.0] and rr.tolist() == [0.0, 0.0]


def test_dpo_loss_gradient_direction():
    """Descending the loss raises log pi(y_w) and lowers log pi(y_l)."""
    pc, pr, rc, rr = dpo_args(requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_implicit_rewards_are_detached():
    """The returned rewards are beta (policy - reference), with no autograd history."""
    pc, pr, rc, rr = dpo_args(requires_grad=True)
    _, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert chosen_r.tolist() == pytest.approx([0.5 * (a - b) for a, b in zip(PC, RC)])
    assert rejected_r.tolist() == pytest.approx([0.5 * (a - b) for a, b in zip(PR, RR)])
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_loss(beta):
    """ipo loss = (h - 1 / (2 beta))^2."""
    losses, _, _ = dpo_loss(*dpo_args(), beta=beta, loss_type="ipo")
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-9)


def test_dpo_unknown_loss_type_raises():
    """An unknown loss_type is a ValueError."""
    with pytest.raises(ValueError):
        dpo_loss(*dpo_args(), beta=0.1, loss_type="hinge-ish")


# rows: left pad + prompt + response + right pad; the mask is 1 on response tokens only
SEQ_MASK = torch.tensor([
    [0, 0, 0, 0, 1, 1, 1, 0],  # pad pad p p r r r pad
    [0, 0, 1, 1, 0, 0, 0, 0],  # pad p r r pad pad pad pad
    [0, 0, 0, 1, 1, 1, 1, 1],  # p p p r r r r r (no padding)
])


def brute_sequence_logps(logits, labels, mask):
    """Sum over t with mask[t] = 1 of log_softmax(logits[t - 1])[labels[t]], with python math."""
    out = []
    for b in range(logits.size(0)):
        total = 0.0
        for t in range(1, logits.size(1)):
            if mask[b, t]:
                row = logits[b, t - 1].tolist()
                total += row[labels[b, t]] - math.log(sum(math.exp(v) for v in row))
        out.append(total)
    return out


def seq_inputs():
    torch.manual_seed(2)
    return torch.randn(3, 8, 5), torch.randint(0, 5, (3, 8))


def test_sequence_logps_matches_brute_force():
    """sequence_logps sums the next-token log-probs of the response tokens only."""
    logits, labels = seq_inputs()
    got = sequence_logps(logits, labels, SEQ_MASK)
    assert got.tolist() == pytest.approx(brute_sequence_logps(logits, labels, SEQ_MASK), rel=1e-5)


def test_sequence_logps_ignores_prompt_labels():
    """Changing a prompt or pad token's id leaves the result unchanged; a response token's does not."""
    logits, labels = seq_inputs()
    base = sequence_logps(logits, labels, SEQ_MASK)
    changed = labels.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 5  # prompt token of row 0
    changed[1, 1] = (changed[1, 1] + 1) % 5  # prompt token of row 1
    changed[0, 7] = (changed[0, 7] + 1) % 5  # right pad of row 0
    assert torch.equal(sequence_logps(logits, changed, SEQ_MASK), base)
    changed[0, 5] = (changed[0, 5] + 1) % 5  # a response token of row 0
    assert sequence_logps(logits, changed, SEQ_MASK)[0] != base[0]


def test_sft_loss_is_the_mean_token_nll():
    """sft_loss = -(sum of response-token log-probs) / (number of response tokens)."""
    logits, labels = seq_inputs()
    n = SEQ_MASK[:, 1:].sum().item()
    assert sft_loss(logits, labels, SEQ_MASK).item() == pytest.approx(
        -sum(brute_sequence_logps(logits, labels, SEQ_MASK)) / n, rel=1e-5)


def test_kl_penalty_estimators_by_hand():
    """k1 = log p - log q; k3 = (q/p - 1) - log(q/p), never negative, 0 where p = q."""
    lp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -2.0, 0.0]])
    assert kl_penalty(lp, ref)[0].tolist() == pytest.approx([0.5, 0.0, -0.5])
    k3 = [(math.exp(r - l) - 1) - (r - l) for l, r in zip(lp[0].tolist(), ref[0].tolist())]
    assert kl_penalty(lp, ref, "k3")[0].tolist() == pytest.approx(k3, rel=1e-6)
    assert (kl_penalty(lp, ref, "k3") >= 0).all() and kl_penalty(lp, ref, "k3")[0, 1] == 0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k2")


def test_kl_penalty_estimates_the_true_kl():
    """Both estimators average to KL(p || q) over samples of p (a 3-way categorical)."""
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    y = torch.multinomial(p, 200000, replacement=True, generator=torch.Generator().manual_seed(0))
    true = (p * (p / q).log()).sum().item()
    for estimator in ("k1", "k3"):
        assert kl_penalty(p.log()[y], q.log()[y], estimator).mean().item() == pytest.approx(true, abs=0.01)


def test_response_logprobs_agree_with_sequence_logps():
    """The PPO/evaluation path (left-padded prompt + response, logits at the temperature) and the
    DPO/SFT path (sequence_logps over the response mask) give the same log pi(y | x)."""
    import data
    from model import GPT, GPTConfig, response_logprobs
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    batch = data.collate([[3, 4, 5], [6]], [[7, 8, 9, 1], [10, 1]], pad_id=0)
    P = 3
    with torch.no_grad():
        token_lp, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], P)
        logits = model(batch["input_ids"], batch["attention_mask"])
    per_row = (token_lp * batch["response_mask"][:, P:]).sum(-1)
    torch.testing.assert_close(per_row, sequence_logps(logits, batch["input_ids"], batch["response_mask"]))


# ----------------------------------------------------------------------------- ppo.py

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
