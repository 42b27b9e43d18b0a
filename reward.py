"""The reward model r_phi(x, y): Bradley-Terry loss, training, centring, and batched scoring.

docs/method.md, "Stage 0": a GPT backbone with a scalar head read at the last real token of x + y,
initialised from the SFT weights and trained on the preference pairs.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plumbing.checkpoint import load_checkpoint, save_checkpoint
from plumbing.checks import setting
from data import collate, encode_response, pair_batch, to_device, tokenize_pairs
from training import FitConfig, Runtime, autocast, epoch_steps, fit


@dataclass
class RMConfig(FitConfig):
    """fit()'s settings and their defaults are FitConfig's."""
    epochs: int = setting(2, "passes over the training pairs", range="[1, inf)")


def bt_loss(chosen_rewards, rejected_rewards):
    """Bradley-Terry loss, L = -mean log sigmoid(r(x, y_w) - r(x, y_l)).

    chosen_rewards, rejected_rewards: (B,) -> scalar. logsigmoid keeps it finite for any gap.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def last_token_index(mask):
    """Index of the last real token of each row, for left or right padding: (B, T) -> (B,)."""
    positions = torch.arange(mask.size(1), device=mask.device)
    return (mask.long() * positions).argmax(-1)


def rewards_at_last_token(values, mask):
    """values (B, T) from the scalar head -> the reward (B,) read at the last real token."""
    return values.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def reward_of(model, batch):
    """The reward of each row of a collated batch: (B,)."""
    values = model(batch["input_ids"], batch["attention_mask"], plan=batch.get("plan"))
    return rewards_at_last_token(values.float(), batch["attention_mask"])


@torch.no_grad()
def score_ids(model, prompts, responses, pad_id, batch_size=64, device="cpu", dtype="fp32"):
    """Rewards of token ids as they are, [prompt ids], [response ids] -> (N,): read at the last
    token, the eos when the response has one. A prompt too long for the context loses its start."""
    model.eval()
    block = model.config.block_size
    out = []
    for i in range(0, len(prompts), batch_size):
        rs = responses[i:i + batch_size]
        ps = [p[max(0, len(p) - (block - len(r))):] for p, r in zip(prompts[i:i + batch_size], rs)]
        batch = to_device(collate(ps, rs, pad_id), device)
        with autocast(device, dtype):
            out.append(reward_of(model, batch).float().cpu())
    return torch.cat(out)


def score(model, tokenizer, prompts, responses, max_response, device="cpu", dtype="fp32"):
    """Rewards of (prompt, response) strings: (N,). One truncation rule everywhere, the one the
    reward model is trained with (data.encode_response): the response and its eos, cut at
    max_response tokens."""
    return score_ids(model, [tokenizer.encode(p) for p in prompts],
                     [encode_response(tokenizer, r)[:max_response] for r in responses], tokenizer.pad_id,
                     device=device, dtype=dtype)


def load_reward_model(folder, device="cpu", dtype=torch.float32):
    """The reward model, frozen, its weights in dtype; it is centred already (see the end of
    train_reward_model)."""
    model, _ = load_checkpoint(folder, kind="scalar", device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def train_reward_model(model, tokenizer, train, held_out, demonstrations, cfg, out_dir,
                       max_response, device="cpu", dtype="fp32", seed=0, base=None, runtime=Runtime()):
    """Train on preference records, centre on the demonstrations, save to out_dir (with adapters
    on a frozen base loaded from the folder `base`: the adapters and the head alone).

    Returns a summary: held-out accuracy against the labels (and against gold when known).
    """
    pairs, _ = tokenize_pairs(tokenizer, train, model.config.block_size, max_response)

    def step_loss(forward, batch):
        chosen, rejected = reward_of(forward, batch).chunk(2)
        return bt_loss(chosen, rejected), {"accuracy": (chosen > rejected).float().mean(),  # read later: fit
                                           "chosen": chosen.mean(), "rejected": rejected.mean()}

    steps = epoch_steps(cfg.epochs, len(pairs), cfg.batch_size)
    fit(model, pairs, lambda rows: pair_batch(rows, tokenizer.pad_id), step_loss, cfg, steps, out_dir, seed,
        device, dtype, "rm", show=("loss", "accuracy"), runtime=runtime)

    # centre: the demonstrations' mean reward becomes 0 (Stiennon et al. 2020), folded into the
    # head's bias so that every later reader, the critic that starts from these weights included,
    # sees centred rewards (as summarize_from_feedback_details does)
    offset = score(model, tokenizer, [p for p, _ in demonstrations], [r for _, r in demonstrations],
                   max_response, device, dtype).mean().item()
    with torch.no_grad():
        model.head.bias -= offset
    summary = {"reward_offset": offset, **evaluate_pairs(model, tokenizer, held_out, max_response, device, dtype)}
    save_checkpoint(model, out_dir, base=base)
    return summary


def evaluate_pairs(model, tokenizer, records, max_response, device="cpu", dtype="fp32"):
    """Pairwise accuracy on records: against the labels, and against the gold ordering when known."""
    prompts = [r["prompt"] for r in records]
    chosen = score(model, tokenizer, prompts, [r["chosen"] for r in records], max_response, device, dtype)
    rejected = score(model, tokenizer, prompts, [r["rejected"] for r in records], max_response, device, dtype)
    out = {"held_out_pairs": len(records), "held_out_accuracy": (chosen > rejected).float().mean().item()}
    if records and "gold_chosen" in records[0]:
        gold = torch.tensor([r["gold_chosen"] - r["gold_rejected"] for r in records])
        decided = gold != 0  # pairs whose gold rewards tie have no right answer
        out["held_out_gold_accuracy"] = ((chosen - rejected)[decided].sign() == gold[decided].sign()).float().mean().item()
    return out


def fact_accuracy(model, tokenizer, prompts, answers, max_response, device="cpu", dtype="fp32"):
    """How often the model scores the right answer above every wrong one to the same question,
    and what a scorer that knows no fact gets by chance. answers(prompt) -> (sentences, index of
    the right one) or None (task.answer_choices)."""
    probes = [(p, *a) for p in prompts for a in [answers(p)] if a]
    flat = [(p, r) for p, rs, _ in probes for r in rs]
    scores = score(model, tokenizer, [p for p, _ in flat], [r for _, r in flat], max_response, device, dtype)
    hits = [float(s[right] > torch.cat([s[:right], s[right + 1:]]).max())
            for (_, _, right), s in zip(probes, scores.split([len(rs) for _, rs, _ in probes]))]
    return {"fact_accuracy": sum(hits) / len(hits), "fact_chance": sum(1 / len(rs) for _, rs, _ in probes) / len(probes)}
