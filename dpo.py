"""DPO (Rafailov et al. 2023): the loss as a pure function, and the DPO training stage.

docs/method.md, "Stage 1": MPO runs DPO on the easy pairs with the SFT model as the reference.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plumbing.checks import setting
from data import batches, pair_batch, to_device, tokenize_pairs
from model import response_token_logps
from training import FitConfig, Runtime, autocast, epoch_steps, fit


@dataclass
class DPOConfig(FitConfig):
    """fit()'s settings are FitConfig's, with DPO's own learning rate."""
    beta: float = setting(0.1, "inverse temperature of the implicit reward", range="(0, inf)")
    label_smoothing: float = setting(0.0, "the assumed label flip rate eps: conservative DPO (sigmoid loss) or "
                                     "robust DPO", range="[0, 0.5)")
    loss_type: str = setting("sigmoid", "sigmoid (DPO), robust (robust DPO), ipo (log-ratios per token, as IPO's "
                             "authors and TRL) or ipo_sum (per sequence)",
                             choices=["sigmoid", "robust", "ipo", "ipo_sum"])
    epochs: int = setting(2, "passes over the training pairs", range="[1, inf)")
    lr: float = setting(1e-4, "peak learning rate", range="(0, inf)")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta, label_smoothing=0.0, loss_type="sigmoid",
             chosen_tokens=None, rejected_tokens=None):
    """The DPO loss and implicit rewards; every argument and result is (B,); the token counts of the
    chosen and rejected responses are needed by ipo alone.

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)],  l(h) = -log sigmoid(beta h)
    sigmoid: L = (1 - eps) l(h) + eps l(-h)             (eps > 0: conservative DPO, Mitchell 2023)
    robust:  L = [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps)    (Chowdhury et al. 2024: unbiased under
             labels flipped with probability eps, since E[L] over the flip is l(h) of the true label)
    ipo:     L = (h' - 1 / (2 beta))^2, h' as h with each log-ratio divided by its response's token
             count: the form IPO's results used (Azar et al. 2023) and TRL computes
    ipo_sum: L = (h - 1 / (2 beta))^2, the margin 1 / (2 beta) on whole sequences
    Implicit rewards (detached): beta (log pi(y) - log pi_ref(y)) for chosen and rejected.
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        per_token = ((policy_chosen_logps - reference_chosen_logps) / chosen_tokens
                     - (policy_rejected_logps - reference_rejected_logps) / rejected_tokens)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "ipo_sum":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid, robust, ipo or ipo_sum)")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_logps(model, batch):
    """One forward pass over the 2B rows of a pair batch -> (chosen (B,), rejected (B,)) log-probs."""
    return response_token_logps(model, batch).sum(-1).chunk(2)


@torch.no_grad()
def precompute_logps(model, pairs, pad_id, batch_size=64, device="cpu", dtype="fp32"):
    """The reference never changes: its log-probs for every pair, once. -> (chosen (N,), rejected (N,))."""
    model.eval()
    chosen, rejected = [], []
    for idx in batches(len(pairs), batch_size, shuffle=False):
        batch = to_device(pair_batch([pairs[i] for i in idx], pad_id), device)
        with autocast(device, dtype):
            c, r = pair_logps(model, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def reference_logps(reference, tokenizer, train, held_out, block_size, max_response, device="cpu", dtype="fp32"):
    """All DPO reads of its frozen reference, once: the log-probs (chosen (N,), rejected (N,)) of the
    pairs of `train` and of `held_out` (None without held-out records). A caller that passes these to
    train_dpo, not the model, frees the reference before training (mpo.dpo_stage)."""
    logps = lambda records: precompute_logps(reference, tokenize_pairs(tokenizer, records, block_size, max_response)[0],
                                             tokenizer.pad_id, device=device, dtype=dtype)
    return {"train": logps(train), "held_out": logps(held_out) if held_out else None}


def train_dpo(policy, reference, tokenizer, train, held_out, cfg, out_dir, max_response,
              device="cpu", dtype="fp32", seed=0, probe=None, runtime=Runtime()):
    """Train policy with DPO against the frozen reference on the preference records `train`.
    reference: the model, or its log-probs (reference_logps).

    Metrics per step go to out_dir/metrics.jsonl, with probe(policy) (the held-out gold reward
    of its samples, when the task has one) every 256 pairs; returns a summary with held-out
    accuracy. The caller saves the policy.
    """
    pairs, _ = tokenize_pairs(tokenizer, train, policy.config.block_size, max_response)
    if not isinstance(reference, dict):
        reference = reference_logps(reference, tokenizer, train, held_out, policy.config.block_size, max_response,
                                    device, dtype)
    ref_chosen, ref_rejected = reference["train"]
    examples = list(zip(pairs, ref_chosen.tolist(), ref_rejected.tolist()))

    def collate(rows):
        return {**pair_batch([pair for pair, _, _ in rows], tokenizer.pad_id),
                "ref_chosen": torch.tensor([c for _, c, _ in rows]), "ref_rejected": torch.tensor([r for _, _, r in rows])}

    def step_loss(forward, batch):
        chosen, rejected = pair_logps(forward, batch)
        tokens = batch["response_mask"][:, 1:].sum(-1).float().chunk(2)  # each response's scored tokens
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"],
                                                cfg.beta, cfg.label_smoothing, cfg.loss_type, *tokens)
        return losses.mean(), {"margin": (chosen_r - rejected_r).mean(),  # read later: fit
                               "accuracy": (chosen_r > rejected_r).float().mean(),
                               "chosen_logps": chosen.mean(), "rejected_logps": rejected.mean()}

    steps = epoch_steps(cfg.epochs, len(pairs), cfg.batch_size)
    fit(policy, examples, collate, step_loss, cfg, steps, out_dir, seed, device, dtype,
        os.path.basename(out_dir), ("loss", "margin"), probe, max(1, 256 // cfg.batch_size), runtime=runtime)
    return {"pairs": len(pairs), "steps": steps,
            "held_out_accuracy": preference_accuracy(policy, reference["held_out"], tokenizer, held_out,
                                                     max_response, device, dtype)}


def preference_accuracy(policy, reference, tokenizer, records, max_response, device="cpu", dtype="fp32"):
    """How often the implicit reward ranks the chosen response above the rejected one; reference:
    the reference's log-probs of the records' pairs (reference_logps)."""
    if not records:
        return None
    pairs, _ = tokenize_pairs(tokenizer, records, policy.config.block_size, max_response)
    pc, pr = precompute_logps(policy, pairs, tokenizer.pad_id, device=device, dtype=dtype)
    rc, rr = reference
    return ((pc - rc) > (pr - rr)).float().mean().item()
