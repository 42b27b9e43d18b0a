"""Mixed Preference Optimization (Gou and Nguyen, arXiv 2403.19443): the paper in one place.

    1. the reward model scores every pair; the gap g = r(x, y_w) - r(x, y_l) splits the data:
       easy = {g > delta}, hard = {g <= delta}                         (split_by_gap)
    2. stage 1: DPO on the easy pairs, reference = SFT                  (dpo_stage)
    3. stage 2: PPO on the hard set's prompts, initialised from the DPO
       policy and with the DPO policy as the KL reference              (ppo_stage)

The baselines and ablations of the paper are rows of METHODS; evaluate_policy judges a policy.
This file adds no loss: those live in reward.py, dpo.py and ppo.py.
"""
import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field

import torch

from data import read_json, write_json
from dpo import train_dpo
from model import generate, load_checkpoint, save_checkpoint
from ppo import token_logprobs, train_ppo
from reward import load_reward_model, score
from training import autocast


@dataclass
class SplitConfig:
    delta: float = field(default=1.0, metadata={"help": "easy = gap > delta, in reward units: under Bradley-Terry "
                                                "the reward model gives the chosen response sigmoid(delta) "
                                                "chance of winning (delta 1 = 73%%)"})
    easy_fraction: float = field(default=0.0, metadata={"help": "if > 0, choose delta so that this fraction "
                                                        "of the pairs is easy (overrides --delta)"})
    gap: str = field(default="signed", metadata={"help": "signed (mislabelled pairs go to hard) or abs (ablation)"})


# The paper's comparison and ablations, each a recipe of the two stages:
#   name:          (DPO pairs,     PPO prompts,   PPO init and reference)
METHODS = {
    "sft":          (None,          None,          None),
    "mpo_stage1":   ("easy",        None,          None),
    "dpo":          ("all",         None,          None),   # baseline: DPO on D, reference SFT
    "ppo":          (None,          "all",         "sft"),  # baseline: PPO on D, init and reference SFT
    "mpo":          ("easy",        "hard",        "dpo"),  # the paper
    "no_selection": ("all",         "all",         "dpo"),  # ablation: no data selection
    "reversed":     ("hard",        "easy",        "dpo"),  # ablation: reversed selection
    "random_split": ("random_easy", "random_hard", "dpo"),  # ablation: a random split of the same sizes
    "mpo_ref_sft":  ("easy",        "hard",        "sft"),  # ablation: stage 2 referenced to SFT
}


def method_stages(name):
    """The stages that make a method's policy: [(stage name, kind, settings)], and the final stage."""
    pairs, prompts, reference = METHODS[name]
    stages, policy = [], "sft"
    if pairs:
        policy = "dpo" if pairs == "easy" else f"dpo_{pairs}"
        stages.append((policy, "dpo", {"pairs": pairs}))
    if prompts:
        ppo_name = {"mpo": "ppo", "ppo": "ppo_baseline"}.get(name, f"ppo_{name}")
        ref = policy if reference == "dpo" else "sft"
        stages.append((ppo_name, "ppo", {"prompts": prompts, "init": policy, "reference": ref}))
        policy = ppo_name
    return stages, policy


# ----------------------------------------------------------------------------- the split

class SplitError(ValueError):
    pass


def reward_gaps(chosen_rewards, rejected_rewards, gap="signed"):
    """g = r(x, y_w) - r(x, y_l): (N,), (N,) -> (N,). gap="abs" takes |g| (ablation)."""
    g = chosen_rewards - rejected_rewards
    return g.abs() if gap == "abs" else g


def delta_for_fraction(gaps, easy_fraction):
    """The delta that puts round(easy_fraction N) pairs in the easy set (exactly, without ties)."""
    k = round(easy_fraction * len(gaps))
    ordered = torch.sort(gaps, descending=True).values
    return ordered[k].item() if k < len(gaps) else ordered[-1].item() - 1.0


def split_by_gap(gaps, delta):
    """easy = {g > delta}, hard = {g <= delta}: index lists. Either set empty is an error."""
    easy = (gaps > delta).nonzero().flatten().tolist()
    hard = (gaps <= delta).nonzero().flatten().tolist()
    for name, subset in (("easy", easy), ("hard", hard)):
        if not subset:
            raise SplitError(f"delta {delta:g} leaves the {name} set empty (the gaps range from "
                             f"{gaps.min().item():.3g} to {gaps.max().item():.3g}); pick a delta in "
                             f"that range, or use --easy-fraction")
    return easy, hard


def text_histogram(gaps, delta, bins=16, width=40):
    """The gap histogram as text, with the bin that holds delta marked."""
    lo, hi = gaps.min().item(), gaps.max().item()
    counts = torch.histc(gaps.float(), bins, lo, hi).long().tolist()
    step = (hi - lo) / bins or 1.0
    lines = [f"reward gaps of {len(gaps)} pairs (delta = {delta:.3g}: easy > delta >= hard)"]
    for i, c in enumerate(counts):
        left = lo + i * step
        mark = " <- delta" if left <= delta < left + step else ""
        lines.append(f"{left:8.2f} | {'#' * round(width * c / max(counts))} {c}{mark}")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot without a display, or None: pictures are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_histogram(gaps, delta, path):
    """A PNG of the gap histogram with delta marked, when matplotlib is installed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(gaps.numpy(), bins=40, color="#4c72b0")
    ax.axvline(delta, color="#c44e52", label=f"delta = {delta:.2f}")
    ax.set(xlabel="reward gap r(x, y_w) - r(x, y_l)", ylabel="pairs", title="hard | easy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_curves(metrics_path, x, keys, path):
    """A PNG with one panel per metric of a metrics.jsonl file (PPO score and KL, DPO margin)."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(axes, keys):
        ax.plot([r[x] for r in rows], [r[key] for r in rows], color="#4c72b0")
        ax.set(xlabel=x, title=key)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def split_stage(rm_dir, records, cfg, out_dir, tokenizer, device="cpu", dtype="fp32"):
    """Score every pair, split by reward gap, and write out_dir/{gaps,easy,hard,summary}.json."""
    from task import label_agreement
    reward_model, offset = load_reward_model(rm_dir, device)
    prompts = [r["prompt"] for r in records]
    chosen = score(reward_model, tokenizer, prompts, [r["chosen"] for r in records], offset, device=device, dtype=dtype)
    rejected = score(reward_model, tokenizer, prompts, [r["rejected"] for r in records], offset, device=device, dtype=dtype)
    gaps = reward_gaps(chosen, rejected, cfg.gap)
    delta = delta_for_fraction(gaps, cfg.easy_fraction) if cfg.easy_fraction > 0 else cfg.delta
    easy, hard = split_by_gap(gaps, delta)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "gaps.json"), gaps.tolist())
    write_json(os.path.join(out_dir, "easy.json"), easy)
    write_json(os.path.join(out_dir, "hard.json"), hard)
    summary = {"delta": delta, "easy": len(easy), "hard": len(hard), "gap": cfg.gap,
               "win_probability_at_delta": 1 / (1 + math.exp(-delta)),
               "easy_label_agreement": label_agreement([records[i] for i in easy]),
               "hard_label_agreement": label_agreement([records[i] for i in hard]),
               "all_label_agreement": label_agreement(records)}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    print(text_histogram(gaps, delta))
    plot_histogram(gaps, delta, os.path.join(out_dir, "gaps.png"))
    return summary


def select(records, split_dir, which, seed=0):
    """The records of one subset: all, easy, hard, or random_easy / random_hard (same sizes)."""
    if which == "all":
        return records
    easy = read_json(os.path.join(split_dir, "easy.json"))
    hard = read_json(os.path.join(split_dir, "hard.json"))
    if which.startswith("random_"):
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        easy, hard = order[:len(easy)], order[len(easy):]
        which = which[len("random_"):]
    return [records[i] for i in {"easy": easy, "hard": hard}[which]]


# ----------------------------------------------------------------------------- the two stages

def file_sha256(folder):
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_frozen(folder, kind, device):
    model, _ = load_checkpoint(folder, kind=kind, device=device)
    return model.eval().requires_grad_(False)


def dpo_stage(init_dir, reference_dir, records, held_out, cfg, out_dir, tokenizer, max_response,
              device="cpu", dtype="fp32", seed=0):
    """Stage 1: DPO from init_dir against the frozen reference_dir (MPO: both SFT, easy pairs)."""
    policy, _ = load_checkpoint(init_dir, kind="gpt", device=device)
    reference = load_frozen(reference_dir, "gpt", device)
    summary = train_dpo(policy, reference, tokenizer, records, held_out, cfg, out_dir, max_response,
                        device, dtype, seed)
    save_checkpoint(policy, out_dir, init_sha256=file_sha256(init_dir),
                    reference_sha256=file_sha256(reference_dir))
    plot_curves(os.path.join(out_dir, "metrics.jsonl"), "step", ["loss", "margin", "accuracy"],
                os.path.join(out_dir, "curves.png"))
    return summary


def ppo_stage(init_dir, reference_dir, rm_dir, prompts, cfg, out_dir, tokenizer, max_new_tokens,
              device="cpu", dtype="fp32", seed=0):
    """Stage 2: PPO from init_dir, KL to reference_dir (MPO: both the DPO policy, hard prompts).

    The critic starts from the reward model; the reward model and the reference stay frozen.
    """
    policy, _ = load_checkpoint(init_dir, kind="gpt", device=device)
    reference = load_frozen(reference_dir, "gpt", device)
    reward_model, offset = load_reward_model(rm_dir, device)
    reward_model.eval().requires_grad_(False)
    critic, _ = load_checkpoint(rm_dir, kind="scalar", device=device)
    final = train_ppo(policy, reference, reward_model, offset, critic, tokenizer, prompts, cfg,
                      out_dir, max_new_tokens, device, dtype, seed)
    save_checkpoint(policy, out_dir, init_sha256=file_sha256(init_dir),
                    reference_sha256=file_sha256(reference_dir))
    plot_curves(os.path.join(out_dir, "metrics.jsonl"), "iteration", ["score", "kl", "kl_coef"],
                os.path.join(out_dir, "curves.png"))
    return final


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def sample_responses(policy, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=0,
                     device="cpu", dtype="fp32", batch_size=64):
    """Sample one response per prompt. Returns [(prompt_ids, response_ids, logprobs)] per prompt."""
    from data import left_pad
    policy.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    room = policy.config.block_size - max_new_tokens
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p)[-room:] for p in prompts[i:i + batch_size]]
        prompt, mask = (t.to(device) for t in left_pad(ids, tokenizer.pad_id))
        with autocast(device, dtype):
            tokens, logprobs, rmask = generate(policy, prompt, mask, max_new_tokens, temperature,
                                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=g)
        for p, t, lp, m in zip(ids, tokens.cpu(), logprobs.cpu(), rmask.cpu()):
            n = int(m.sum())
            out.append((p, t[:n].tolist(), lp[:n]))
    return out


@torch.no_grad()
def evaluate_policy(policy, sft, reward_model, offset, tokenizer, prompts, max_new_tokens,
                    temperature=1.0, seed=0, gold=None, device="cpu", dtype="fp32"):
    """Per-prompt judgements of one policy's samples: gold reward (when known), reward-model
    score, KL to SFT (sum over the response of log pi - log pi_sft), length, and the text."""
    from data import collate
    samples = sample_responses(policy, tokenizer, prompts, max_new_tokens, temperature, seed, device, dtype)
    texts = [tokenizer.decode(r) for _, r, _ in samples]
    kl = []
    for i in range(0, len(samples), 64):
        chunk = samples[i:i + 64]
        batch = {k: v.to(device) for k, v in collate([p for p, _, _ in chunk], [r for _, r, _ in chunk], tokenizer.pad_id).items()}
        P = max(len(p) for p, _, _ in chunk)
        with autocast(device, dtype):
            logits = sft(batch["input_ids"], batch["attention_mask"])[:, P - 1:-1].float() / temperature
        sft_lp = token_logprobs(logits, batch["input_ids"][:, P:]) * batch["response_mask"][:, P:]
        kl += [(lp.sum() - s.sum()).item() for (_, _, lp), s in zip(chunk, sft_lp.cpu())]
    rm = score(reward_model, tokenizer, prompts, texts, offset, device=device, dtype=dtype).tolist()
    return {"text": texts, "rm_score": rm, "kl_vs_sft": kl, "length": [len(r) for _, r, _ in samples],
            "gold_reward": [gold(p, t) for p, t in zip(prompts, texts)] if gold else None}


def win_rate(values, baseline):
    """Fraction of prompts where values beats baseline; ties count half."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(values, baseline)]
    return sum(wins) / len(wins)


def summarize(judged, sft_judged):
    """Per-method means, and the win rate against SFT by the gold reward (or the reward model)."""
    mean = lambda xs: sum(xs) / len(xs)
    judge = "gold_reward" if judged["gold_reward"] is not None else "rm_score"
    row = {"rm_score": mean(judged["rm_score"]), "win_rate_vs_sft": win_rate(judged[judge], sft_judged[judge]),
           "kl_vs_sft": mean(judged["kl_vs_sft"]), "length": mean(judged["length"])}
    if judged["gold_reward"] is not None:
        row = {"gold_reward": mean(judged["gold_reward"]), **row}
    return row


# ----------------------------------------------------------------------------- the results table

COLUMNS = [("gold_reward", "gold reward", "{:+.3f}"), ("rm_score", "RM score", "{:+.3f}"),
           ("win_rate_vs_sft", "win vs SFT", "{:.3f}"), ("kl_vs_sft", "KL vs SFT", "{:.2f}"),
           ("length", "length", "{:.1f}"), ("seconds", "seconds", "{:.0f}")]


def write_table(results, path):
    rows = results["methods"]
    cols = [c for c in COLUMNS if c[0] in next(iter(rows.values()))]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in rows.items():
        cells = []
        for key, _, fmt in cols:
            cell = fmt.format(row[key])
            if f"{key}_std" in row:
                cell += " ± " + fmt.format(row[f"{key}_std"]).lstrip("+")
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    s = results.get("split", {})
    if s.get("delta") is not None:
        lines.append(f"\nsplit: delta {s['delta']:.3g}, easy {s['easy']}, hard {s['hard']}")
        if s.get("easy_label_agreement") is not None:
            lines[-1] += (f", label agreement with gold: easy {s['easy_label_agreement']:.3f}, "
                          f"hard {s['hard_label_agreement']:.3f}")
    if results.get("reused"):
        lines.append(f"reused stages: {', '.join(results['reused'])}")
    text = "\n".join(lines) + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print("\n" + text)


def aggregate(runs):
    """Mean and standard deviation over seeds of every figure of every method."""
    out = {}
    for m in runs[0]["methods"]:
        out[m] = {}
        for key in runs[0]["methods"][m]:
            xs = [r["methods"][m][key] for r in runs]
            out[m][key] = statistics.mean(xs)
            out[m][f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    split = {k: statistics.mean(r["split"][k] for r in runs) if runs[0]["split"][k] is not None else None
             for k in runs[0]["split"]}
    return {"methods": out, "split": split, "seeds": [r["config"]["seed"] for r in runs],
            "config": runs[0]["config"]}
