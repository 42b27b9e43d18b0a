"""PPO for language models: GAE, clipped policy and value losses, KL penalty, rollouts and the loop.

docs/method.md, "Stage 2". In MPO the policy starts from the DPO model, the KL reference is the DPO
model, and the prompts are those of the hard set; the critic starts from the reward model.
Shapes: B rollouts, N response tokens; `mask` (B, N) is 1 on response tokens (a prefix of each row).
"""
import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import distributed
import packing
from data import append_jsonl, left_pad
from model import kl_penalty, positions, response_logprobs
from checkpoint import StepState
from training import Figures, autocast, backward, compiled, grad_scaler, optimizer_step, progress, truncate_jsonl
from reward import rewards_at_last_token
from sampling import generate


@dataclass
class PPOConfig:
    """Each field's "range" is what checks.py accepts (an interval: [ and ] include the end)."""
    iterations: int = field(default=145, metadata={"help": "rollout-and-update rounds on all the pairs' prompts; "
                                                   "a step on a subset runs this times its share (MPO's hard "
                                                   "set, about 55%%: 80)", "range": "[1, inf)"})
    rollouts: int = field(default=64, metadata={"help": "responses sampled per iteration", "range": "[1, inf)"})
    epochs: int = field(default=2, metadata={"help": "optimisation passes over each batch of rollouts",
                                               "range": "[1, inf)"})
    minibatches: int = field(default=2, metadata={"help": "minibatches per epoch", "range": "[1, inf)"})
    lr: float = field(default=1e-4, metadata={"help": "policy learning rate", "range": "(0, inf)"})
    critic_lr: float = field(default=1e-4, metadata={"help": "critic learning rate", "range": "(0, inf)"})
    clip: float = field(default=0.2, metadata={"help": "policy ratio clip eps", "range": "(0, inf)"})
    clip_value: float = field(default=0.2, metadata={"help": "value clip eps_v", "range": "(0, inf)"})
    gamma: float = field(default=1.0, metadata={"help": "discount", "range": "[0, 1]"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda", "range": "[0, 1]"})
    # fixed, and 1.0: docs/method.md, "What the paper leaves open"
    kl_coef: float = field(default=1.0, metadata={"help": "beta_kl (initial beta_kl when adaptive)",
                                                   "range": "[0, inf)"})
    kl_target: float = field(default=0.0, metadata={"help": "adaptive KL target (nats per response); 0 = fixed beta_kl",
                                                     "range": "[0, inf)"})
    kl_horizon: int = field(default=640, metadata={"help": "adaptive KL horizon in rollouts (640: ten iterations of 64)",
                                                    "range": "[1, inf)"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimate: k1 (log ratio) or k3",
                                                      "choices": ["k1", "k3"]})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature, also used to recompute log-probs",
                                                       "range": "(0, inf)"})
    no_eos_score: float = field(default=-2.0, metadata={"help": "score of a response cut at the length limit (EOS trick)",
                                                         "range": "(-inf, inf)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip", "range": "(0, inf)"})
    micro_batch: int = field(default=0, metadata={"help": "rollouts per forward pass in a minibatch (gradient "
                                                  "accumulation) and in scoring: less memory, the same update (0: "
                                                  "the whole minibatch at once)", "range": "[0, inf)"})
    save_every: int = field(default=10, metadata={"help": "save a resumable step state every N iterations (0: by --save-minutes alone)",
                                                  "range": "[0, inf)"})
    sample_every: int = field(default=10, metadata={"help": "print samples every N iterations (0: never)",
                                                    "range": "[0, inf)"})


# ----------------------------------------------------------------------------- the math, pure functions

def masked_mean(x, mask, count=None):
    """Mean of x over the positions where mask is 1: their sum over their count, or over `count`
    (data parallel: the whole minibatch's token count over all ranks, train_ppo)."""
    n = mask.sum() if count is None else count
    return (x * mask).sum() / n.clamp(min=1)


def masked_var(x, mask):
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x, mask, eps=1e-8, total=lambda t: t):
    """(x - mean) / std over the valid tokens of the batch; padding stays 0. Data parallel, total
    sums over the ranks (distributed.total): the statistics are the whole batch's."""
    count = total(mask.sum()).clamp(min=1)
    mean = total((x * mask).sum()) / count
    var = total(((x - mean) ** 2 * mask).sum()) / count
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t,
    with V = 0 after the last response token. rewards, values, mask: (B, N) -> (advantages, returns).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def token_rewards(scores, kl, mask, kl_coef):
    """r_t = -beta_kl KL_t + [t = T] s, with KL_t = model.kl_penalty(log pi_old, log pi_ref).

    scores (B,); kl, mask (B, N) -> rewards (B, N), zero on padding.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def eos_trick(scores, tokens, mask, eos_id, penalty):
    """Responses that hit the length limit without eos get the fixed score `penalty` instead."""
    has_eos = ((tokens == eos_id) & mask.bool()).any(-1)
    return torch.where(has_eos, scores, torch.full_like(scores, penalty)), has_eos


def policy_loss(logprobs, old_logprobs, advantages, mask, clip, n_tokens=None):
    """Clipped surrogate: mean_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)).

    All (B, N) -> (loss, clip fraction, approximate KL (k3 estimator, Schulman 2020)), each a
    masked_mean over n_tokens.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask, n_tokens)
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask, n_tokens)
    return masked_mean(losses, mask, n_tokens), clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip_value, n_tokens=None):
    """0.5 mean_t max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2); all (B, N) -> scalar."""
    clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, n_tokens)


class FixedKL:
    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, kl, n):
        pass


class AdaptiveKL:
    """Ziegler et al. 2019: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n):
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over valid tokens (a 0-dim tensor): 1 is a perfect critic, 0 no better
    than a mean."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


# ----------------------------------------------------------------------------- rollouts

@torch.no_grad()
def rollout(policy, reward_model, prompts, tokenizer, cfg, max_new_tokens, device, dtype, generator):
    """Sample responses to `prompts` (lists of ids) and score them with the reward model.

    Returns seq (B, P + N) = left-padded prompt + response, attn (B, P + N), P, tokens and mask
    (B, N), the raw scores (B,), the sampling time, and on the host the responses' lengths (B,)
    and attn: the one read of the rollouts, so that no later forward pass reads (host_plan)."""
    host_prompt, host_prompt_mask = left_pad(prompts, tokenizer.pad_id)
    prompt, prompt_mask = (packing.to_device(t, device) for t in (host_prompt, host_prompt_mask))
    policy.eval()  # dropout off while sampling and scoring; the update turns it back on
    t0 = time.perf_counter()
    with autocast(device, dtype):
        tokens, mask = generate(policy, prompt, prompt_mask, max_new_tokens, cfg.temperature,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=generator)
        if tokens.is_cuda:
            torch.cuda.synchronize()  # a fair split of the time between sampling and scoring
        seconds_generate = time.perf_counter() - t0
        seq, attn = torch.cat([prompt, tokens], 1), torch.cat([prompt_mask, mask], 1)
        lengths = mask.sum(-1).cpu()  # responses are a prefix of their row (sampling.generate)
        host_attn = torch.cat([host_prompt_mask, (torch.arange(mask.size(1)) < lengths[:, None]).long()], 1)
        ro = {"seq": seq, "attn": attn, "P": prompt.size(1), "tokens": tokens, "mask": mask.float(),
              "lengths": lengths, "host_attn": host_attn, "seconds_generate": seconds_generate}
        rows = micro_batches(torch.arange(len(seq)), cfg.micro_batch)
        scores = []
        for r in rows:
            d = packing.to_device(r, device)
            values = reward_model(seq[d], attn[d], plan=host_plan(ro, r, device)[0]).float()
            scores.append(rewards_at_last_token(values, attn[d]))  # centred already
    return {**ro, "scores": torch.cat(scores)}


def host_plan(ro, rows, device):
    """What a forward pass over the rollouts `rows` (a host index tensor) would read back from the
    device, found on the host from their lengths: (its packing, packing.plan; the flat positions of
    its response tokens, model.response_logprobs)."""
    attn = ro["host_attn"][rows]
    response = attn.bool()
    response[:, :ro["P"]] = False
    return packing.plan(attn, device).to(device), packing.to_device(positions(response), device)


def minibatch_indices(n, m, generator):
    """One epoch's minibatches: a random order of the n rollouts cut into m parts whose sizes differ
    by one at most (10 into 4: 3, 3, 2, 2), so --ppo-minibatches is what runs."""
    return torch.randperm(n, generator=generator).tensor_split(m)


def micro_batches(mb, size):
    """The rows of a minibatch in forward passes of at most `size` rollouts (0: all at once)."""
    return mb.split(size) if size else [mb]


def old_logprobs(policy, reference, critic, ro, minibatches, temperature, device, dtype):
    """log pi_old, log pi_ref, V_old (B, N) and the policy's entropy per token, for the rollouts.

    log pi_old is the update's own computation: the same module (compiled, DDP-wrapped), the same
    rows together, the same autocast, train mode and autograd on (a compiled module runs another
    graph in eval mode or without grad, and another graph may round otherwise), then detached. So
    the first minibatch's ratio is exactly 1 in any precision. (The model has no dropout; with
    dropout, train mode would make log pi_old noisy.) minibatches: the first epoch's, each split
    into its micro-batches as the update splits it.
    """
    policy.train()
    critic.eval()  # V_old is read with dropout off, as the reward model reads the rollouts
    seq, attn, P, mask = ro["seq"], ro["attn"], ro["P"], ro["mask"]
    out = {k: torch.zeros_like(mask) for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    for rows in minibatches:
        plan, at = host_plan(ro, rows, device)
        mb = packing.to_device(rows, device)
        with autocast(device, dtype):
            logprobs, entropy = response_logprobs(policy, seq[mb], attn[mb], P, temperature, mask[mb], entropy=True,
                                                  plan=plan, at=at)
            with torch.no_grad():
                ref_logprobs, _ = response_logprobs(reference, seq[mb], attn[mb], P, temperature, mask[mb],
                                                    plan=plan, at=at)
                values = critic(seq[mb], attn[mb], plan=plan)[:, P - 1:-1].float()
        out["logprobs"][mb], out["ref_logprobs"][mb], out["values"][mb] = logprobs.detach(), ref_logprobs, values
        out["entropy"][mb] = entropy
    return {k: v * mask for k, v in out.items()}


# Data parallel, each rank holds some rows of a minibatch. A rank's loss is its token sum over the
# whole minibatch's token count n (all ranks), times the ranks W, since DDP averages the ranks'
# gradients: the update is the whole minibatch's token mean, whatever the ranks' response lengths.
# The figures (the rank's share, times W) average over the ranks to the whole minibatch's.

def minibatch_policy_loss(policy, seq, attn, P, mask, old_logprobs, advantages, cfg, device, dtype, n=None,
                          plan=None, at=None):
    """One minibatch's clipped policy loss on this rank's rows -> (loss to backward, figures: 0-dim
    tensors, this rank's share; times W, they average over the ranks to the minibatch's). n: the whole
    minibatch's token count, when these rows are one micro-batch of it; plan, at: host_plan's."""
    W, n = distributed.world_size(), distributed.total(mask.sum()) if n is None else n
    with autocast(device, dtype):
        logprobs, _ = response_logprobs(policy, seq, attn, P, cfg.temperature, mask, plan=plan, at=at)
    loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip, n)
    return W * loss, {"policy_loss": loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl}


def minibatch_value_loss(critic, seq, attn, P, mask, old_values, returns, cfg, device, dtype, n=None, plan=None):
    """One minibatch's clipped value loss on this rank's rows -> (loss to backward, figures as above)."""
    W, n = distributed.world_size(), distributed.total(mask.sum()) if n is None else n
    with autocast(device, dtype):
        values = critic(seq, attn, plan=plan)[:, P - 1:-1].float()
    loss = value_loss(values, old_values, returns, mask, cfg.clip_value, n)
    return W * loss, {"value_loss": loss.detach()}


def accumulate(forward, parts, scaler, step, loss_of):
    """Gradient accumulation over a minibatch's micro-batches: backward each part's loss (its token
    sum over the whole minibatch's count, so the parts add up to the minibatch's loss), DDP reducing
    at the last part only. -> each part's figures, for Figures.add: the minibatch's, summed, times W.
    The losses are checked with the figures, when they are read (training.Figures)."""
    no_sync = getattr(forward, "no_sync", contextlib.nullcontext)
    figures = []
    for j, part in enumerate(parts):
        with (contextlib.nullcontext() if j == len(parts) - 1 else no_sync()):
            loss, row = loss_of(*part)
            backward(loss, scaler, step, check=False)
        figures.append((distributed.world_size(), row))
    return figures


# ----------------------------------------------------------------------------- the loop

def train_ppo(policy, reference, reward_model, critic, tokenizer, prompts, cfg,
              out_dir, max_new_tokens, device="cpu", dtype="fp32", seed=0, gold=None):
    """PPO on `prompts` (strings). Trains policy and critic in place; metrics to out_dir/metrics.jsonl.

    gold(prompt, response) -> float, when the task has one, is logged per iteration on the
    rollouts (free: the samples exist) to show where the policy starts to hack the reward model.

    Data parallel (distributed.py), each rank samples rollouts / W of the iteration's prompts with
    its own generator, whitens the advantages with the whole batch's statistics, and DDP averages
    the gradients of its minibatches; the logged figures are means over the ranks.
    """
    os.makedirs(out_dir, exist_ok=True)
    room = policy.config.block_size - max_new_tokens
    prompt_ids = [tokenizer.encode(p)[-room:] for p in prompts]  # keep the end of a long dialogue
    device_type = torch.device(device).type
    policy_opt = policy.configure_optimizers(cfg.lr, 0.0, device_type=device_type)
    critic_opt = critic.configure_optimizers(cfg.critic_lr, 0.0, device_type=device_type)
    policy_scaler, critic_scaler = grad_scaler(device, dtype), grad_scaler(device, dtype)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0 else FixedKL(cfg.kl_coef)
    W = distributed.world_size()
    g = torch.Generator().manual_seed(seed)  # the prompts and minibatches: the same on every rank
    sample_g = torch.Generator(device=device).manual_seed(seed + distributed.rank())
    state = StepState(out_dir, cfg.save_every, cfg.iterations, {"policy": policy, "critic": critic},
                      {"policy_opt": policy_opt, "critic_opt": critic_opt}, [g, sample_g],
                      {"policy_scaler": policy_scaler, "critic_scaler": critic_scaler})
    start, extra = state.restore()
    kl_ctl.value = extra.get("kl_coef", kl_ctl.value)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    truncate_jsonl(metrics_path, "iteration", start)
    # DDP(compile(model)) on purpose: see training.fit
    policy_forward, critic_forward = distributed.wrap(compiled(policy)), distributed.wrap(compiled(critic))
    bar = progress(cfg.iterations, os.path.basename(out_dir), start)
    for it in range(start, cfg.iterations):
        t0 = time.time()
        idx = distributed.shard(torch.randint(len(prompt_ids), (cfg.rollouts,), generator=g).tolist())
        ro = rollout(policy, reward_model, [prompt_ids[i] for i in idx], tokenizer, cfg, max_new_tokens,
                     device, dtype, sample_g)
        seq, attn, P, mask = ro["seq"], ro["attn"], ro["P"], ro["mask"]
        # every epoch's minibatches, drawn now: the old log-probs are computed on the first epoch's
        epochs = [minibatch_indices(len(idx), cfg.minibatches, g) for _ in range(cfg.epochs)]
        first = [part for mb in epochs[0] for part in micro_batches(mb, cfg.micro_batch)]
        old = old_logprobs(policy_forward, reference, critic_forward, ro, first, cfg.temperature, device, dtype)
        # EOS trick: a response cut at the length limit gets a fixed penalty score
        scores, has_eos = eos_trick(ro["scores"], ro["tokens"], mask, tokenizer.eos_id, cfg.no_eos_score)
        kl = kl_penalty(old["logprobs"], old["ref_logprobs"], cfg.kl_estimator) * mask  # (B, N)
        rewards = token_rewards(scores, kl, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask, total=distributed.total)  # over the valid tokens of the batch
        if seq.is_cuda:
            torch.cuda.synchronize()  # a fair split of the time between rollout and update (once per iteration)
        t_rollout = time.time() - t0

        policy.train()
        critic.train()
        # the figures stay on the device, read once at the iteration's end with the finiteness guard
        reads = Figures()
        for minibatches in epochs:
            for mb in minibatches:
                n = distributed.total(mask[packing.to_device(mb, device)].sum())  # its response tokens, all ranks
                parts = [(packing.to_device(r, device), *host_plan(ro, r, device)) for r in micro_batches(mb, cfg.micro_batch)]
                policy_figures = accumulate(policy_forward, parts, policy_scaler, it, lambda r, plan, at: minibatch_policy_loss(
                    policy_forward, seq[r], attn[r], P, mask[r], old["logprobs"][r], advantages[r], cfg, device, dtype, n,
                    plan, at))
                norm = optimizer_step(None, policy_opt, cfg.grad_clip, policy_scaler, it, check=False)
                reads.add(it, policy_figures, norm if policy_scaler is None else None, loss="policy_loss")
                value_figures = accumulate(critic_forward, parts, critic_scaler, it, lambda r, plan, at: minibatch_value_loss(
                    critic_forward, seq[r], attn[r], P, mask[r], old["values"][r], returns[r], cfg, device, dtype, n, plan))
                norm = optimizer_step(None, critic_opt, cfg.grad_clip, critic_scaler, it, check=False)
                reads.add(it, value_figures, norm if critic_scaler is None else None, loss="value_loss")

        # score: what PPO maximises (the reward model's score after the EOS trick); rm_score: before it
        reads.add(it, [(1.0, {"score": scores.mean(), "rm_score": ro["scores"].mean(), "kl": kl.sum(-1).mean(),
                              "kl_coef": kl_ctl.value, "entropy": masked_mean(old["entropy"], mask),
                              "length": mask.sum(-1).mean(), "eos_fraction": has_eos.float().mean(),
                              "explained_variance": explained_variance(old["values"], returns, mask)})], loss=None)
        *minibatch_rows, figures = [f for _, f in reads.read()]  # the one read of the update; raises at a non-finite step
        stats = {k: [f[k] for f in minibatch_rows if k in f] for k in ("clipfrac", "approx_kl", "policy_loss", "value_loss")}
        figures.update({**{k: sum(v) / len(v) for k, v in stats.items()}, "seconds_generate": ro["seconds_generate"],
                        "seconds_rollout": t_rollout, "seconds_update": time.time() - t0 - t_rollout})
        if gold is not None:  # evaluation, not training: runs.method_costs leaves seconds_gold out
            t1 = time.time()
            texts = [tokenizer.decode(t[:int(n)].tolist()) for t, n in zip(ro["tokens"].cpu(), ro["lengths"])]
            figures["gold"] = sum(gold(prompts[i], t) for i, t in zip(idx, texts)) / len(idx)
            figures["seconds_gold"] = time.time() - t1
        row = {"iteration": it, **distributed.sum_row({k: v / W for k, v in figures.items()})}  # means over ranks
        kl = row["kl"]  # per response, the figure the controller steers
        kl_ctl.update(kl, cfg.rollouts)  # adaptive KL coefficient (Ziegler et al. 2019), or fixed
        append_jsonl(metrics_path, row)
        bar.update()
        bar.set_postfix(score=f"{row['score']:.2f}", kl=f"{kl:.2f}", ev=f"{row['explained_variance']:.2f}")
        if cfg.sample_every and (it % cfg.sample_every == 0 or it == cfg.iterations - 1):
            for i in range(2):
                tqdm.write(f"  [{it}] {tokenizer.decode(seq[i, :P].tolist())!r} -> "
                           f"{tokenizer.decode(ro['tokens'][i].tolist())!r}  score {scores[i]:.2f}")
        state.save(it + 1, {"kl_coef": kl_ctl.value})
    bar.close()
    return row
