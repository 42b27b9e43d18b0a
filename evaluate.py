"""Judging policies on the held-out prompts: K samples per prompt at the sampling temperature and
one greedy answer, scored by the task's gold reward where it has one (the built-in task), else by
the judge (real data: a reward model trained on pairs nothing else saw, stages.judge_stage), and by
the training reward model always; well-formedness, KL to SFT and length; win, tie and loss rates
against SFT and against the data's chosen responses, by the judge; and the paired difference of
every method against MPO.

A figure per prompt is the mean over its K samples, so methods are compared prompt by prompt
on the same prompts (paired), which is what lets a few hundred prompts separate them.
"""
import statistics

import torch
from tqdm import tqdm

from data import collate, encode_response, left_pad
from model import kl_penalty, response_logprobs
from sampling import generate
from plumbing.report import paired_interval
from reward import score_ids
from training import autocast


@torch.no_grad()
def sample_responses(policy, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=0,
                     device="cpu", dtype="fp32", batch_size=64):
    """One response per prompt (temperature 0: greedy). Returns [(prompt_ids, response_ids)]."""
    policy.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    room = policy.config.block_size - max_new_tokens
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p)[-room:] for p in prompts[i:i + batch_size]]
        prompt, mask = (t.to(device) for t in left_pad(ids, tokenizer.pad_id))
        with autocast(device, dtype):
            tokens, rmask = generate(policy, prompt, mask, max_new_tokens, temperature,
                                     eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id, generator=g)
        out += [(p, t[:int(m.sum())].tolist()) for p, t, m in zip(ids, tokens.cpu(), rmask.cpu())]
    return out


def scored(samples, reward_model, tokenizer, no_eos_score, device, dtype):
    """The reward model's score of the sampled ids; a response cut at the length limit gets
    no_eos_score, as in PPO (None: its score as it is, as the judge reads it)."""
    rm = score_ids(reward_model, *zip(*samples), tokenizer.pad_id, device=device, dtype=dtype)
    if no_eos_score is None:
        return rm.tolist()
    finished = torch.tensor([any(i in tokenizer.stop_ids for i in r) for _, r in samples])
    return torch.where(finished, rm, torch.full_like(rm, no_eos_score)).tolist()


@torch.no_grad()
def kl_to(policy, sft, samples, pad_id, temperature, device, dtype):
    """Sum over each response of log pi - log pi_sft, both from one full forward pass at the
    sampling temperature, as in the rollout."""
    kl = []
    for i in range(0, len(samples), 64):
        chunk = samples[i:i + 64]
        batch = {k: v.to(device) for k, v in collate(*zip(*chunk), pad_id).items()}
        P = max(len(p) for p, _ in chunk)
        with autocast(device, dtype):
            mask = batch["response_mask"][:, P:]
            logprobs, _ = response_logprobs(policy, batch["input_ids"], batch["attention_mask"], P, temperature, mask)
            sft_logprobs, _ = response_logprobs(sft, batch["input_ids"], batch["attention_mask"], P, temperature, mask)
        kl += (kl_penalty(logprobs, sft_logprobs) * mask).sum(-1).tolist()
    return kl


def evaluate_policy(policy, sft, reward_model, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=0,
                    task=None, no_eos_score=-2.0, samples=1, device="cpu", dtype="fp32", judge=None):
    """Per-prompt judgements of one policy: each figure is the mean over `samples` samples of the
    prompt (the reward-model score, the KL to SFT, the length and, where the task knows them, the
    gold reward and whether the text is well formed; with a judge, a second reward model, its
    score "judge_score" of each response as it is: like the gold reward, and unlike "rm_score",
    it gives a cut response no no_eos_score, a rule of what PPO optimised); "text" is the first
    sample's; "greedy" is the judge's value (gold, else the judge, else the reward model) of the
    greedy answer."""
    N = len(prompts)
    drawn = sample_responses(policy, tokenizer, prompts * samples, max_new_tokens, temperature, seed, device, dtype)
    texts = [tokenizer.decode(r) for _, r in drawn]
    per_sample = {"rm_score": scored(drawn, reward_model, tokenizer, no_eos_score, device, dtype),
                  "kl_vs_sft": kl_to(policy, sft, drawn, tokenizer.pad_id, temperature, device, dtype),
                  "length": [len(r) for _, r in drawn]}
    if task and task["gold"]:
        per_sample["gold_reward"] = [task["gold"](p, t) for p, t in zip(prompts * samples, texts)]
        per_sample["well_formed"] = [float(task["well_formed"](p, t)) for p, t in zip(prompts * samples, texts)]
    elif judge is not None:
        per_sample["judge_score"] = scored(drawn, judge, tokenizer, None, device, dtype)
    judged = {key: [statistics.fmean(values[i::N]) for i in range(N)] for key, values in per_sample.items()}
    greedy = sample_responses(policy, tokenizer, prompts, max_new_tokens, 0.0, seed, device, dtype)
    if "gold_reward" in judged:
        judged["greedy"] = [task["gold"](p, tokenizer.decode(r)) for p, (_, r) in zip(prompts, greedy)]
    elif judge is not None:
        judged["greedy"] = scored(greedy, judge, tokenizer, None, device, dtype)
    else:
        judged["greedy"] = scored(greedy, reward_model, tokenizer, no_eos_score, device, dtype)
    judged["text"] = texts[:N]
    return judged


def chosen_values(task, reward_model, tokenizer, max_response, no_eos_score=-2.0, device="cpu", dtype="fp32"):
    """[(index of the evaluation prompt, the judge's value of the data's chosen response)] for the
    held-out records whose prompt is evaluated: the reference of the win rate against the data.
    The judge is the task's gold reward, else reward_model (on real data, the judge's).
    The chosen response is judged as a policy's answer is: cut at max_response tokens, and a cut
    one (no eos) gets no_eos_score from the reward model (the judge's passes None: its score as
    it is), its decoded text from the gold reward."""
    index = {p: i for i, p in enumerate(task["eval"])}
    records = [r for r in task["held_out"] if r["prompt"] in index]
    if not records:
        return []
    room = reward_model.config.block_size - max_response
    answers = [(tokenizer.encode(r["prompt"])[-room:], encode_response(tokenizer, r["chosen"])[:max_response])
               for r in records]
    if task["gold"]:
        values = [task["gold"](r["prompt"], tokenizer.decode(ids)) for r, (_, ids) in zip(records, answers)]
    else:
        values = scored(answers, reward_model, tokenizer, no_eos_score, device, dtype)
    return [(index[r["prompt"]], v) for r, v in zip(records, values)]


def win_tie_loss(values, baseline):
    """Fractions of pairs where values beats, ties or loses to baseline."""
    n = len(values)
    wins = sum(a > b for a, b in zip(values, baseline)) / n
    ties = sum(a == b for a, b in zip(values, baseline)) / n
    return wins, ties, 1.0 - wins - ties


def judge_key(judged):
    """The figure that judges: the gold reward (built-in task), else the judge's score (real data),
    else the training reward model's (runs from before the judge)."""
    return next(key for key in ("gold_reward", "judge_score", "rm_score") if key in judged)


def summarize(judged, sft_judged, chosen=()):
    """A method's row: the means over prompts, the win/tie/loss rates against SFT prompt by prompt
    and the win rate against the data's chosen responses (ties count half), all by the judge."""
    judge = judge_key(judged)
    row = {key: statistics.fmean(judged[key]) for key in ("gold_reward", "judge_score", "greedy", "well_formed",
                                                           "rm_score") if key in judged}
    win, tie, loss = win_tie_loss(judged[judge], sft_judged[judge])
    row.update(win_vs_sft=win, tie_vs_sft=tie, loss_vs_sft=loss, win_rate_vs_sft=win + tie / 2)
    if chosen:
        w, t, _ = win_tie_loss([judged[judge][i] for i, _ in chosen], [v for _, v in chosen])
        row["win_vs_chosen"] = w + t / 2
    row.update(kl_vs_sft=statistics.fmean(judged["kl_vs_sft"]), length=statistics.fmean(judged["length"]))
    return row


def against_mpo(judged):
    """MPO minus each other method, paired over prompts, by the judge: {method: interval}. Over
    one seed this measures the sampling noise of the evaluation only, not training's."""
    if "mpo" not in judged:
        return {}
    judge = judge_key(judged["mpo"])
    return {m: paired_interval(judged["mpo"][judge], j[judge]) for m, j in judged.items() if m != "mpo"}


def mean_gold(policy, tokenizer, task, max_new_tokens, temperature, seed, device="cpu", dtype="fp32", show=0,
              prompts=None):
    """Mean gold reward of one sample per evaluation prompt (or per prompt of `prompts`): a cheap
    probe during training; prints the first `show` samples."""
    prompts = task["eval"] if prompts is None else prompts
    samples = sample_responses(policy, tokenizer, prompts, max_new_tokens, temperature, seed, device, dtype)
    texts = [tokenizer.decode(r) for _, r in samples]
    golds = [task["gold"](p, t) for p, t in zip(prompts, texts)]
    for p, t, gr in list(zip(prompts, texts, golds))[:show]:
        tqdm.write(f"  {p.strip()!r}\n    -> {t!r}  gold {gr:+.2f}")
    return sum(golds) / len(golds)
