"""DPO (Rafailov et al. 2023): the loss as a pure function, and the DPO training stage.

PAPER.md, "Stage 1": MPO runs DPO on the easy pairs with the SFT model as the reference.
"""
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import append_jsonl, batches, pair_batch, tokenize_pairs
from training import StepState, autocast, compiled, cosine_lr, grad_scaler, optimizer_step, set_lr, truncate_jsonl


@dataclass
class DPOConfig:
    pairs: str = field(default="easy", metadata={"help": "which pairs: easy (MPO stage 1), all (the DPO baseline), hard (reversed)"})
    beta: float = field(default=0.1, metadata={"help": "inverse temperature of the implicit reward"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO: assumed label flip rate"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo"})
    epochs: int = field(default=2, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step"})
    lr: float = field(default=3e-5, metadata={"help": "peak learning rate"})
    warmup: int = field(default=10, metadata={"help": "warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    save_every: int = field(default=50, metadata={"help": "save a resumable step state every N steps (0: never)"})


def sequence_logps(logits, labels, mask):
    """Sum of log pi(y_t | x, y_<t) over the response tokens.

    logits (B, T, V), labels (B, T), mask (B, T) 1 on response tokens -> (B,).
    The logits at position t predict the token at t + 1; prompt and padding never count.
    """
    logits, labels, mask = logits[:, :-1].float(), labels[:, 1:], mask[:, 1:]
    token_logps = logits.gather(-1, labels[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta, label_smoothing=0.0, loss_type="sigmoid"):
    """The DPO loss and implicit rewards; every argument and result is (B,).

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
    sigmoid: L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  (eps > 0: conservative DPO)
    ipo:     L = (h - 1 / (2 beta))^2                                         (Azar et al. 2023)
    Implicit rewards (detached): beta (log pi(y) - log pi_ref(y)) for chosen and rejected.
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid or ipo)")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_logps(model, batch):
    """One forward pass over the 2B rows of a pair batch -> (chosen (B,), rejected (B,)) log-probs."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return sequence_logps(logits, batch["input_ids"], batch["response_mask"]).chunk(2)


@torch.no_grad()
def precompute_logps(model, pairs, pad_id, batch_size=64, device="cpu", dtype="fp32"):
    """The reference never changes: its log-probs for every pair, once. -> (chosen (N,), rejected (N,))."""
    model.eval()
    chosen, rejected = [], []
    for idx in batches(len(pairs), batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in pair_batch([pairs[i] for i in idx], pad_id).items()}
        with autocast(device, dtype):
            c, r = pair_logps(model, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def train_dpo(policy, reference, tokenizer, train, held_out, cfg, out_dir, max_response,
              device="cpu", dtype="fp32", seed=0):
    """Train policy with DPO against the frozen reference on the preference records `train`.

    Metrics per step go to out_dir/metrics.jsonl; returns a summary with held-out accuracy.
    The caller saves the policy.
    """
    os.makedirs(out_dir, exist_ok=True)
    block = policy.config.block_size
    pairs, _ = tokenize_pairs(tokenizer, train, block, max_response)
    ref_chosen, ref_rejected = precompute_logps(reference, pairs, tokenizer.pad_id, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    plan = [b for _ in range(cfg.epochs) for b in batches(len(pairs), cfg.batch_size, g)]
    opt = policy.configure_optimizers(cfg.lr, cfg.weight_decay, device_type=torch.device(device).type)
    scaler = grad_scaler(device, dtype)
    state = StepState(out_dir, cfg.save_every, len(plan), {"policy": policy}, {"opt": opt})
    start, _ = state.restore()
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    truncate_jsonl(metrics_path, "step", start)
    policy.train()
    forward = compiled(policy)
    bar = tqdm(plan, desc=os.path.basename(out_dir), dynamic_ncols=True, initial=start)
    for step, idx in enumerate(plan[start:], start):
        set_lr(opt, cosine_lr(step, len(plan), cfg.warmup, cfg.lr))
        batch = {k: v.to(device) for k, v in pair_batch([pairs[i] for i in idx], tokenizer.pad_id).items()}
        with autocast(device, dtype):
            chosen, rejected = pair_logps(forward, batch)
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref_chosen[idx].to(device),
                                                ref_rejected[idx].to(device), cfg.beta,
                                                cfg.label_smoothing, cfg.loss_type)
        loss = losses.mean()
        optimizer_step(loss, opt, cfg.grad_clip, scaler, step)
        row = {"step": step, "loss": loss.item(), "margin": (chosen_r - rejected_r).mean().item(),
               "accuracy": (chosen_r > rejected_r).float().mean().item(),
               "chosen_logps": chosen.mean().item(), "rejected_logps": rejected.mean().item()}
        append_jsonl(metrics_path, row)
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['margin']:.2f}")
        state.save(step + 1)
    bar.close()
    return {"pairs": len(pairs), "steps": len(plan),
            "held_out_accuracy": preference_accuracy(policy, reference, tokenizer, held_out,
                                                     max_response, device, dtype)}


def preference_accuracy(policy, reference, tokenizer, records, max_response, device="cpu", dtype="fp32"):
    """How often the implicit reward ranks the chosen response above the rejected one."""
    if not records:
        return None
    pairs, _ = tokenize_pairs(tokenizer, records, policy.config.block_size, max_response)
    pc, pr = precompute_logps(policy, pairs, tokenizer.pad_id, device=device, dtype=dtype)
    rc, rr = precompute_logps(reference, pairs, tokenizer.pad_id, device=device, dtype=dtype)
    return ((pc - rc) > (pr - rr)).float().mean().item()
