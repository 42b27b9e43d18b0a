"""dpo.py's loss against hand computations: the sigmoid and IPO losses, their gradients and the
implicit rewards."""
import math
import os

import pytest
import torch

from dpo import dpo_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def softplus(x):
    """log(1 + exp(x)) on a python float, stable for any x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def log_sigmoid(x):
    return -softplus(-x)


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


NC, NR = [4.0, 10.0], [2.0, 5.0]  # the chosen and rejected responses' token counts


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_losses(beta):
    """ipo = (h' - 1 / (2 beta))^2 with each log-ratio per token (IPO's results, TRL);
    ipo_sum = (h - 1 / (2 beta))^2 on the sequences' sums."""
    counts = [torch.tensor(x, dtype=torch.float64) for x in (NC, NR)]
    per_token, _, _ = dpo_loss(*dpo_args(), beta=beta, loss_type="ipo", chosen_tokens=counts[0], rejected_tokens=counts[1])
    summed, _, _ = dpo_loss(*dpo_args(), beta=beta, loss_type="ipo_sum")
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        h_token = (PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]
        assert summed[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-9)
        assert per_token[i].item() == pytest.approx((h_token - 1 / (2 * beta)) ** 2, rel=1e-9)


def test_dpo_unknown_loss_type_raises():
    """An unknown loss_type is a ValueError."""
    with pytest.raises(ValueError):
        dpo_loss(*dpo_args(), beta=0.1, loss_type="hinge-ish")


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_dpo_loss_hand_values_and_unbiasedness(beta, eps):
    """robust = [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps), l(h) = -log sig(beta h) (Chowdhury et
    al. 2024); averaged over a label flipped with probability eps it is l(h) of the true label."""
    losses, _, _ = dpo_loss(*dpo_args(), beta=beta, label_smoothing=eps, loss_type="robust")
    swapped, _, _ = dpo_loss(*[dpo_args()[i] for i in (1, 0, 3, 2)], beta=beta, label_smoothing=eps,
                             loss_type="robust")  # the same pairs with chosen and rejected swapped: -h
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        l = lambda x: -log_sigmoid(beta * x)
        assert losses[i].item() == pytest.approx(((1 - eps) * l(h) - eps * l(-h)) / (1 - 2 * eps), rel=1e-9)
        assert ((1 - eps) * losses[i] + eps * swapped[i]).item() == pytest.approx(l(h), rel=1e-9)


# TRL 1.16's own loss code (DPOTrainer._compute_loss) on given log-probs: a stand-in trainer whose
# model returns per-token log-probs that sum to the sequences' (reference log-probs precomputed)
TRL_LOSSES = """
import collections, json, sys, types
from bench import anchors as bench_anchors
bench_anchors.use_trl("1.16.0")
import torch
from trl import DPOTrainer

cases, (B, L) = json.loads(sys.argv[1]), (4, 9)
torch.manual_seed(0)
completion = torch.zeros(2 * B, L, dtype=torch.long)
for r in range(2 * B):
    completion[r, 3:5 + r % 5] = 1
log_probs = -torch.rand(2 * B, L - 1) * completion[:, 1:]
ref = -torch.rand(2 * B)
out = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(2 * B, L - 1),
                            mean_logits=torch.zeros(2 * B, L - 1), is_top1=torch.zeros(2 * B, L - 1, dtype=torch.bool))
model = lambda **kw: out
model.training = True
same = lambda x: x
inputs = {"input_ids": torch.zeros(2 * B, L, dtype=torch.long), "attention_mask": torch.ones(2 * B, L, dtype=torch.long),
          "completion_mask": completion, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
losses = []
for loss_type, beta, eps in cases:
    trainer = types.SimpleNamespace(
        model=model, accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=same, gather=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    losses.append(float(DPOTrainer._compute_loss(trainer, model, inputs, False)))
print(json.dumps({"losses": losses, "logps": log_probs.sum(1).tolist(), "ref": ref.tolist(),
                  "tokens": completion.sum(1).tolist()}))
"""


def test_the_losses_equal_trl_1_16s_on_the_same_log_probs():
    """DPO, robust DPO and IPO (per token) against TRL 1.16's DPOTrainer computing them from the
    same log-probs (its sigmoid loss has no label smoothing any more: conservative DPO is checked by
    hand above); skipped unless bench/anchors.py --install has put TRL in .anchors/."""
    import json
    import subprocess
    import sys
    from bench import anchors as bench_anchors
    if not bench_anchors.installed():
        pytest.skip("TRL is not installed: python3 -m bench.anchors --install")
    cases = [("sigmoid", 0.1, 0.0), ("robust", 0.1, 0.2), ("robust", 0.5, 0.4), ("ipo", 0.1, 0.0),
             ("ipo", 0.5, 0.0)]
    proc = subprocess.run([sys.executable, "-c", TRL_LOSSES, json.dumps(cases)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trl = json.loads(proc.stdout.splitlines()[-1])
    logps, ref, tokens = (torch.tensor(trl[k]) for k in ("logps", "ref", "tokens"))
    B = len(logps) // 2
    for (loss_type, beta, eps), theirs in zip(cases, trl["losses"]):
        ours = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, eps, loss_type,
                        tokens[:B].float(), tokens[B:].float())[0].mean()
        assert ours.item() == pytest.approx(theirs, rel=1e-6), (loss_type, beta, eps)
