"""PPO for language models: GAE, clipped policy and value losses, KL penalty, rollouts and the loop.

docs/method.md, "Stage 2". In MPO the policy starts from the DPO model, the KL reference is the DPO
model, and the prompts are those of the hard set; the critic starts from the reward model.
Shapes: B rollouts, N response tokens; `mask` (B, N) is 1 on response tokens (a prefix of each row).
"""
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import left_pad
from model import kl_penalty
from plumbing import distributed, packing
from plumbing.checkpoint import StepState
from plumbing.checks import setting
from plumbing.files import append_jsonl, truncate_jsonl
from plumbing.ppo_batches import Learner, MicroBatch, host_plan
from plumbing.progress import progress
from reward import rewards_at_last_token
from sampling import generate, is_stop
from training import Figures, Runtime, autocast


@dataclass
class PPOConfig:
    """Flags --ppo-*."""
    iterations: int = setting(145, "rollout-and-update rounds on all the pairs' prompts; a step on a subset runs "
                              "this times its share (MPO's hard set, about 55%%: 80)", range="[1, inf)")
    rollouts: int = setting(64, "responses sampled per iteration", range="[1, inf)")
    epochs: int = setting(2, "optimisation passes over each batch of rollouts", range="[1, inf)")
    minibatches: int = setting(2, "minibatches per epoch", range="[1, inf)")
    lr: float = setting(1e-4, "policy learning rate", range="(0, inf)")
    critic_lr: float = setting(1e-4, "critic learning rate", range="(0, inf)")
    clip: float = setting(0.2, "policy ratio clip eps", range="(0, inf)")
    clip_value: float = setting(0.2, "value clip eps_v", range="(0, inf)")
    gamma: float = setting(1.0, "discount", range="[0, 1]")
    lam: float = setting(0.95, "GAE lambda", range="[0, 1]")
    # fixed, and 1.0: docs/method.md, "What the paper leaves open"
    kl_coef: float = setting(1.0, "beta_kl (initial beta_kl when adaptive)", range="[0, inf)")
    kl_target: float = setting(0.0, "adaptive KL target (nats per response); 0 = fixed beta_kl", range="[0, inf)")
    kl_horizon: int = setting(640, "adaptive KL horizon in rollouts (640: ten iterations of 64)", range="[1, inf)")
    kl_estimator: str = setting("k1", "per-token KL estimate: k1 (log ratio) or k3", choices=["k1", "k3"])
    temperature: float = setting(1.0, "sampling temperature, also used to recompute log-probs", range="(0, inf)")
    no_eos_score: float = setting(-2.0, "score of a response cut at the length limit (EOS trick)", range="(-inf, inf)")
    grad_clip: float = setting(1.0, "gradient norm clip", range="(0, inf)")
    micro_batch: int = setting(0, "rollouts per forward pass in a minibatch (gradient accumulation) and in scoring: "
                               "less memory, the same update (0: the whole minibatch at once)", range="[0, inf)")
    save_every: int = setting(10, "save a resumable step state every N iterations (0: by --save-minutes alone)",
                              range="[0, inf)")
    sample_every: int = setting(10, "print samples every N iterations (0: never)", range="[0, inf)")


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
    """Responses that hit the length limit without eos (an id or a list of ids) get the fixed score
    `penalty` instead."""
    has_eos = (is_stop(tokens, eos_id) & mask.bool()).any(-1)
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

@dataclass
class Rollouts:
    """One iteration's samples (rollout): B rollouts of P prompt and N response tokens, on the device;
    lengths and host_attn on the host, where the forward passes over them are planned (host_plan)."""
    seq: torch.Tensor         # (B, P + N) the left-padded prompt, then the response
    attn: torch.Tensor        # (B, P + N) 1 on real tokens
    prompt_len: int           # P
    tokens: torch.Tensor      # (B, N) the responses
    mask: torch.Tensor        # (B, N) float, 1 on response tokens (a prefix of each row)
    lengths: torch.Tensor     # (B,) on the host: the responses' lengths
    host_attn: torch.Tensor   # (B, P + N) attn on the host: the one read of the rollouts
    scores: torch.Tensor      # (B,) the reward model's scores, before the EOS trick
    seconds_generate: float   # the sampling time

    def micro_batches(self, rows, size, device, n_tokens=None):
        """The rollouts `rows` (a host index tensor) in forward passes of at most `size` rollouts
        (0: all at once), each planned on the host (ppo_batches.MicroBatch)."""
        return [MicroBatch(self, packing.to_device(r, device), *host_plan(self, r, device), n_tokens)
                for r in (rows.split(size) if size else [rows])]

    def minibatch(self, rows, size, device):
        """An update's minibatch, its micro-batches carrying its response tokens over all ranks: the
        count every part's loss divides by, so that the parts add up to the minibatch's token mean."""
        n_tokens = distributed.total(self.mask[packing.to_device(rows, device)].sum())
        return self.micro_batches(rows, size, device, n_tokens)


@torch.no_grad()
def rollout(policy, reward_model, prompts, tokenizer, cfg, max_new_tokens, device, dtype, generator):
    """Sample responses to `prompts` (lists of ids) and score them with the reward model -> Rollouts.
    On the host, the responses' lengths and attn: the one read of the rollouts, so that no later
    forward pass reads (host_plan)."""
    host_prompt, host_prompt_mask = left_pad(prompts, tokenizer.pad_id)
    prompt, prompt_mask = (packing.to_device(t, device) for t in (host_prompt, host_prompt_mask))
    policy.eval()  # dropout off while sampling and scoring; the update turns it back on
    t0 = time.perf_counter()
    with autocast(device, dtype):
        tokens, mask = generate(policy, prompt, prompt_mask, max_new_tokens, cfg.temperature,
                                eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id, generator=generator)
        if tokens.is_cuda:
            torch.cuda.synchronize()  # a fair split of the time between sampling and scoring
        seconds_generate = time.perf_counter() - t0
        lengths = mask.sum(-1).cpu()  # responses are a prefix of their row (sampling.generate)
        host_attn = torch.cat([host_prompt_mask, (torch.arange(mask.size(1)) < lengths[:, None]).long()], 1)
        rollouts = Rollouts(torch.cat([prompt, tokens], 1), torch.cat([prompt_mask, mask], 1), prompt.size(1),
                            tokens, mask.float(), lengths, host_attn, scores=None, seconds_generate=seconds_generate)
        scores = []
        for part in rollouts.micro_batches(torch.arange(len(tokens)), cfg.micro_batch, device):
            values = reward_model(part.seq, part.attn, plan=part.plan).float()
            scores.append(rewards_at_last_token(values, part.attn))  # centred already
    rollouts.scores = torch.cat(scores)
    return rollouts


def minibatch_indices(n, m, generator):
    """One epoch's minibatches: a random order of the n rollouts cut into m parts whose sizes differ
    by one at most (10 into 4: 3, 3, 2, 2), so --ppo-minibatches is what runs."""
    return torch.randperm(n, generator=generator).tensor_split(m)


def old_logprobs(policy, reference, critic, rollouts, minibatches, cfg, device, dtype):
    """log pi_old, log pi_ref, V_old (B, N) and the policy's entropy per token, for the rollouts.

    log pi_old is the update's own computation: the same module (compiled, DDP-wrapped), the same
    rows together, the same autocast, train mode and autograd on (a compiled module runs another
    graph in eval mode or without grad, and another graph may round otherwise), then detached. So
    the first minibatch's ratio is exactly 1 in any precision. (The model has no dropout; with
    dropout, train mode would make log pi_old noisy.) minibatches: the first epoch's rows, each
    split into its micro-batches as the update splits it.
    """
    policy.train()
    critic.eval()  # V_old is read with dropout off, as the reward model reads the rollouts
    out = {k: torch.zeros_like(rollouts.mask) for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    for rows in minibatches:
        for part in rollouts.micro_batches(rows, cfg.micro_batch, device):
            with autocast(device, dtype):
                logprobs, entropy = part.logprobs(policy, cfg.temperature, entropy=True)
                with torch.no_grad():
                    ref_logprobs, _ = part.logprobs(reference, cfg.temperature)
                    values = part.values(critic)
            r = part.rows
            out["logprobs"][r], out["ref_logprobs"][r], out["values"][r] = logprobs.detach(), ref_logprobs, values
            out["entropy"][r] = entropy
    return {k: v * rollouts.mask for k, v in out.items()}


# ----------------------------------------------------------------------------- the update

# Data parallel, each rank holds some rows of a minibatch. A rank's loss is its token sum over the
# whole minibatch's token count n (all ranks), times the ranks (world), since DDP averages the
# ranks' gradients: the update is the whole minibatch's token mean, whatever the ranks' response
# lengths. The figures (the rank's share, times world) average over the ranks to the minibatch's.

def minibatch_policy_loss(policy, part, old_logprobs, advantages, cfg, device, dtype):
    """A micro-batch's clipped policy loss -> (loss to backward, figures: 0-dim tensors, this rank's
    share of the minibatch's). old_logprobs, advantages: (B, N), every rollout's."""
    with autocast(device, dtype):
        logprobs, _ = part.logprobs(policy, cfg.temperature)
    loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs[part.rows], advantages[part.rows], part.mask,
                                            cfg.clip, part.n_tokens)
    return distributed.world_size() * loss, {"policy_loss": loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl}


def minibatch_value_loss(critic, part, old_values, returns, cfg, device, dtype):
    """A micro-batch's clipped value loss -> (loss to backward, figures as above)."""
    with autocast(device, dtype):
        values = part.values(critic)
    loss = value_loss(values, old_values[part.rows], returns[part.rows], part.mask, cfg.clip_value, part.n_tokens)
    return distributed.world_size() * loss, {"value_loss": loss.detach()}


def ppo_update(learners, minibatch, old, advantages, returns, it, reads):
    """One minibatch's update: a step of the policy on the clipped surrogate loss, then one of the
    critic on the clipped value loss (docs/method.md, "Stage 2")."""
    policy, critic = learners
    policy.step(minibatch, it, reads, old["logprobs"], advantages)
    critic.step(minibatch, it, reads, old["values"], returns)


# ----------------------------------------------------------------------------- the iteration's bookkeeping

def step_state(out_dir, cfg, learners, generators, minutes=0.0):
    """What resuming inside the stage needs (checkpoint.StepState)."""
    policy, critic = learners
    return StepState(out_dir, cfg.save_every, cfg.iterations, {"policy": policy.model, "critic": critic.model},
                     {"policy_opt": policy.opt, "critic_opt": critic.opt}, generators,
                     {"policy_scaler": policy.scaler, "critic_scaler": critic.scaler}, minutes)


def read_figures(reads):
    """The one read of an iteration's figures (raising at a non-finite step): its own figures, the
    last added, and the means over the minibatches of theirs."""
    *minibatch_rows, figures = [f for _, f in reads.read()]
    stats = {k: [f[k] for f in minibatch_rows if k in f] for k in ("clipfrac", "approx_kl", "policy_loss", "value_loss")}
    return {**figures, **{k: sum(v) / len(v) for k, v in stats.items()}}


class Log:
    """What an iteration leaves: its row of out_dir/metrics.jsonl (cut back to `start` on a resume;
    data parallel, the means over the ranks), the progress bar's figures, and every
    cfg.sample_every iterations the first two rollouts."""

    def __init__(self, out_dir, cfg, start, tokenizer, gold=None):
        self.path, self.cfg, self.tokenizer, self.gold = os.path.join(out_dir, "metrics.jsonl"), cfg, tokenizer, gold
        truncate_jsonl(self.path, "iteration", start)
        self.bar = progress(cfg.iterations, os.path.basename(out_dir), start)

    def write(self, it, reads, rollouts, scores, prompts, t0, seconds_rollout):
        """The row of iteration `it`, begun at t0: the figures of reads (the one read), the seconds
        of its parts, and the gold reward of the rollouts when the task has one."""
        figures = {**read_figures(reads), "seconds_generate": rollouts.seconds_generate,
                   "seconds_rollout": seconds_rollout, "seconds_update": time.time() - t0 - seconds_rollout}
        if self.gold is not None:  # evaluation, not training: runs.method_costs leaves seconds_gold out
            t_gold = time.time()
            texts = [self.tokenizer.decode(t[:int(n)].tolist())
                     for t, n in zip(rollouts.tokens.cpu(), rollouts.lengths)]
            figures.update(gold=sum(self.gold(p, t) for p, t in zip(prompts, texts)) / len(prompts),
                           seconds_gold=time.time() - t_gold)
        world = distributed.world_size()
        row = {"iteration": it, **distributed.sum_row({k: v / world for k, v in figures.items()})}  # means over ranks
        append_jsonl(self.path, row)
        self.bar.update()
        self.bar.set_postfix(score=f"{row['score']:.2f}", kl=f"{row['kl']:.2f}", ev=f"{row['explained_variance']:.2f}")
        if self.cfg.sample_every and (it % self.cfg.sample_every == 0 or it == self.cfg.iterations - 1):
            for i in range(2):
                tqdm.write(f"  [{it}] {self.tokenizer.decode(rollouts.seq[i, :rollouts.prompt_len].tolist())!r} -> "
                           f"{self.tokenizer.decode(rollouts.tokens[i].tolist())!r}  score {scores[i]:.2f}")
        return row


# ----------------------------------------------------------------------------- the loop

def train_ppo(policy, reference, reward_model, critic, tokenizer, prompts, cfg,
              out_dir, max_new_tokens, device="cpu", dtype="fp32", seed=0, gold=None, runtime=Runtime()):
    """PPO on `prompts` (strings). Trains policy and critic in place; metrics to out_dir/metrics.jsonl.

    gold(prompt, response) -> float, when the task has one, is logged per iteration on the
    rollouts (free: the samples exist) to show where the policy starts to hack the reward model.
    Data parallel (plumbing/distributed.py), each rank samples rollouts / world of the iteration's
    prompts with its own generator, whitens the advantages with the whole batch's statistics, and
    DDP averages the gradients of its minibatches; the logged figures are means over the ranks.
    """
    os.makedirs(out_dir, exist_ok=True)
    room = policy.config.block_size - max_new_tokens
    prompt_ids = [tokenizer.encode(p)[-room:] for p in prompts]  # keep the end of a long dialogue
    learners = (Learner(policy, cfg.lr, minibatch_policy_loss, "policy_loss", cfg, device, dtype),
                Learner(critic, cfg.critic_lr, minibatch_value_loss, "value_loss", cfg, device, dtype))
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0 else FixedKL(cfg.kl_coef)
    g = torch.Generator().manual_seed(seed)  # the prompts and minibatches: the same on every rank
    sample_g = torch.Generator(device=device).manual_seed(seed + distributed.rank())
    state = step_state(out_dir, cfg, learners, [g, sample_g], runtime.save_minutes)
    start, extra = state.restore()
    kl_ctl.value = extra.get("kl_coef", kl_ctl.value)
    log = Log(out_dir, cfg, start, tokenizer, gold)
    policy_forward, critic_forward = (learner.wrap(runtime.compile) for learner in learners)
    for it in range(start, cfg.iterations):
        t0 = time.time()
        idx = distributed.shard(torch.randint(len(prompt_ids), (cfg.rollouts,), generator=g).tolist())
        rollouts = rollout(policy, reward_model, [prompt_ids[i] for i in idx], tokenizer, cfg, max_new_tokens,
                           device, dtype, sample_g)
        mask = rollouts.mask
        # every epoch's minibatches, drawn now: the old log-probs are computed on the first epoch's
        epochs = [minibatch_indices(len(idx), cfg.minibatches, g) for _ in range(cfg.epochs)]
        old = old_logprobs(policy_forward, reference, critic_forward, rollouts, epochs[0], cfg, device, dtype)
        # EOS trick: a response cut at the length limit gets a fixed penalty score
        scores, has_eos = eos_trick(rollouts.scores, rollouts.tokens, mask, tokenizer.stop_ids, cfg.no_eos_score)
        kl = kl_penalty(old["logprobs"], old["ref_logprobs"], cfg.kl_estimator) * mask  # (B, N)
        rewards = token_rewards(scores, kl, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask, total=distributed.total)  # over the valid tokens of the batch
        if mask.is_cuda:
            torch.cuda.synchronize()  # a fair split of the time between rollout and update (once per iteration)
        t_rollout = time.time() - t0

        policy.train()
        critic.train()
        reads = Figures()  # the figures stay on the device, read once at the iteration's end
        for minibatches in epochs:
            for rows in minibatches:
                ppo_update(learners, rollouts.minibatch(rows, cfg.micro_batch, device), old, advantages, returns,
                           it, reads)

        # score: what PPO maximises (the reward model's score after the EOS trick); rm_score: before it
        reads.add(it, [(1.0, {"score": scores.mean(), "rm_score": rollouts.scores.mean(), "kl": kl.sum(-1).mean(),
                              "kl_coef": kl_ctl.value, "entropy": masked_mean(old["entropy"], mask),
                              "length": mask.sum(-1).mean(), "eos_fraction": has_eos.float().mean(),
                              "explained_variance": explained_variance(old["values"], returns, mask)})], loss=None)
        row = log.write(it, reads, rollouts, scores, [prompts[i] for i in idx], t0, t_rollout)
        kl_ctl.update(row["kl"], cfg.rollouts)  # adaptive KL coefficient (Ziegler et al. 2019), or fixed
        state.save(it + 1, {"kl_coef": kl_ctl.value})
    log.bar.close()
    return row
