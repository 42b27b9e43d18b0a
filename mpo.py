"""Mixed Preference Optimization (Gou and Nguyen, arXiv 2403.19443): the paper in one place.

    1. the reward model scores every pair; the gap g = r(x, y_w) - r(x, y_l) splits the data:
       easy = {g > delta}, hard = {g <= delta}                         (split_by_gap)
    2. stage 1: DPO on the easy pairs, reference = SFT                  (dpo_stage)
    3. stage 2: PPO on the hard set's prompts, initialised from the DPO
       policy and with the DPO policy as the KL reference              (ppo_stage)

The baselines and ablations of the paper are rows of METHODS; pipeline() runs the stages of
each method in the paper's order; evaluate_policy judges a policy. This file adds no loss: those
live in model.py (log-probs, SFT), reward.py, dpo.py and ppo.py.
"""
import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from tqdm import tqdm

import data
from checkpoint import file_sha256, load_checkpoint, load_gpt, save_checkpoint, save_hf_gpt2
from data import collate, left_pad, read_json, write_json
from dpo import train_dpo
from model import GPT, GPTConfig, generate, kl_penalty, response_logprobs
from ppo import train_ppo
from reward import load_reward_model, score, score_ids, train_reward_model
from report import plot_curves, plot_histogram, text_histogram, write_table
from sft import train_sft
from task import label_agreement
from training import Runner, Stop, autocast


@dataclass
class SplitConfig:
    delta: float = field(default=1.0, metadata={"help": "easy = gap > delta, in reward units: under Bradley-Terry "
                                                "the reward model gives the chosen response sigmoid(delta) "
                                                "chance of winning (delta 1 = 73%%)"})
    easy_fraction: float = field(default=0.0, metadata={"help": "if > 0, choose delta so that this fraction "
                                                        "of the pairs is easy (overrides --delta)"})
    gap: str = field(default="signed", metadata={"help": "signed (mislabelled pairs go to hard) or abs (ablation)",
                                                 "choices": ["signed", "abs"]})


class Method(NamedTuple):
    """A method is a recipe of the two stages. pairs: the pairs DPO trains on, from the SFT policy
    against SFT (None: no DPO stage). prompts: the prompts PPO trains on, from the policy so far
    (None: no PPO stage). reference: PPO's KL reference, "policy" (the policy PPO starts from) or
    "sft". role: "method" (always run), "baseline" (--compare) or "ablation" (--ablations)."""
    pairs: Optional[str]
    prompts: Optional[str]
    reference: Optional[str]
    role: str


# The paper's comparison and ablations. Adding one is adding a row.
METHODS = {
    "sft":          Method(None,          None,          None,     "method"),
    "mpo_stage1":   Method("easy",        None,          None,     "method"),    # stage 1 alone
    "mpo":          Method("easy",        "hard",        "policy", "method"),    # the paper
    "dpo":          Method("all",         None,          None,     "baseline"),  # DPO on D, reference SFT
    "ppo":          Method(None,          "all",         "policy", "baseline"),  # PPO on D, init and reference SFT
    "no_selection": Method("all",         "all",         "policy", "ablation"),  # no data selection
    "reversed":     Method("hard",        "easy",        "policy", "ablation"),  # reversed selection
    "random_split": Method("random_easy", "random_hard", "policy", "ablation"),  # a random split, same sizes
    "mpo_ref_sft":  Method("easy",        "hard",        "sft",    "ablation"),  # stage 2 referenced to SFT
}
BASELINES = [name for name, m in METHODS.items() if m.role == "baseline"]
ABLATIONS = [name for name, m in METHODS.items() if m.role == "ablation"]


def method_stages(name):
    """The stages that make a method's policy, [(stage name, kind, recipe)], and its final stage.

    A stage's name says what it trains, so two methods that share a stage share its folder."""
    method = METHODS[name]
    stages, policy = [], "sft"
    if method.pairs:
        policy = "dpo" if method.pairs == "easy" else f"dpo_{method.pairs}"
        stages.append((policy, "dpo", {"pairs": method.pairs}))
    if method.prompts:
        ppo_name = {"mpo": "ppo", "ppo": "ppo_baseline"}.get(name, f"ppo_{name}")
        reference = policy if method.reference == "policy" else "sft"
        stages.append((ppo_name, "ppo", {"prompts": method.prompts, "init": policy, "reference": reference}))
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


def split_stage(rm_dir, records, cfg, out_dir, tokenizer, max_response, device="cpu", dtype="fp32"):
    """Score every pair, split by reward gap, and write out_dir/{gaps,easy,hard,summary}.json."""
    reward_model = load_reward_model(rm_dir, device)
    prompts = [r["prompt"] for r in records]
    chosen = score(reward_model, tokenizer, prompts, [r["chosen"] for r in records], max_response, device, dtype)
    rejected = score(reward_model, tokenizer, prompts, [r["rejected"] for r in records], max_response, device, dtype)
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

def load_frozen(folder, kind, device):
    model, _ = load_checkpoint(folder, kind=kind, device=device)
    return model.eval().requires_grad_(False)


def dpo_stage(init_dir, reference_dir, records, held_out, cfg, out_dir, tokenizer, max_response,
              device="cpu", dtype="fp32", seed=0, probe=None):
    """Stage 1: DPO from init_dir against the frozen reference_dir (MPO: both SFT, easy pairs)."""
    policy, _ = load_checkpoint(init_dir, kind="gpt", device=device)
    reference = load_frozen(reference_dir, "gpt", device)
    summary = train_dpo(policy, reference, tokenizer, records, held_out, cfg, out_dir, max_response,
                        device, dtype, seed, probe)
    save_checkpoint(policy, out_dir, init_sha256=file_sha256(init_dir),
                    reference_sha256=file_sha256(reference_dir))
    plot_curves(os.path.join(out_dir, "metrics.jsonl"), "step", ["loss", "margin", "accuracy", "gold"],
                os.path.join(out_dir, "curves.png"))
    return summary


def ppo_stage(init_dir, reference_dir, rm_dir, prompts, cfg, out_dir, tokenizer, max_new_tokens,
              device="cpu", dtype="fp32", seed=0, gold=None):
    """Stage 2: PPO from init_dir, KL to reference_dir (MPO: both the DPO policy, hard prompts).

    The critic starts from the reward model; the reward model and the reference stay frozen.
    """
    policy, _ = load_checkpoint(init_dir, kind="gpt", device=device)
    reference = load_frozen(reference_dir, "gpt", device)
    reward_model = load_reward_model(rm_dir, device)
    critic, _ = load_checkpoint(rm_dir, kind="scalar", device=device)
    final = train_ppo(policy, reference, reward_model, critic, tokenizer, prompts, cfg,
                      out_dir, max_new_tokens, device, dtype, seed, gold)
    save_checkpoint(policy, out_dir, init_sha256=file_sha256(init_dir),
                    reference_sha256=file_sha256(reference_dir))
    plot_curves(os.path.join(out_dir, "metrics.jsonl"), "iteration", ["score", "gold", "kl", "kl_coef"],
                os.path.join(out_dir, "curves.png"), versus=("kl", ["score", "gold"]))
    return final


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def sample_responses(policy, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=0,
                     device="cpu", dtype="fp32", batch_size=64):
    """Sample one response per prompt. Returns [(prompt_ids, response_ids)] per prompt."""
    policy.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    room = policy.config.block_size - max_new_tokens
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p)[-room:] for p in prompts[i:i + batch_size]]
        prompt, mask = (t.to(device) for t in left_pad(ids, tokenizer.pad_id))
        with autocast(device, dtype):
            tokens, rmask = generate(policy, prompt, mask, max_new_tokens, temperature,
                                     eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=g)
        out += [(p, t[:int(m.sum())].tolist()) for p, t, m in zip(ids, tokens.cpu(), rmask.cpu())]
    return out


@torch.no_grad()
def evaluate_policy(policy, sft, reward_model, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=0,
                    task=None, no_eos_score=-2.0, device="cpu", dtype="fp32"):
    """Per-prompt judgements of one policy's samples: reward-model score of the sampled ids (a
    response cut at the length limit gets no_eos_score, as in PPO), KL to SFT (sum over the
    response of log pi - log pi_sft, both from one full forward pass at the sampling temperature,
    as in the rollout), length, the text, and where the task knows them, the gold reward and
    whether the text is well formed."""
    samples = sample_responses(policy, tokenizer, prompts, max_new_tokens, temperature, seed, device, dtype)
    texts = [tokenizer.decode(r) for _, r in samples]
    kl = []
    for i in range(0, len(samples), 64):
        chunk = samples[i:i + 64]
        batch = {k: v.to(device) for k, v in collate(*zip(*chunk), tokenizer.pad_id).items()}
        P = max(len(p) for p, _ in chunk)
        with autocast(device, dtype):
            logprobs, _ = response_logprobs(policy, batch["input_ids"], batch["attention_mask"], P, temperature)
            sft_logprobs, _ = response_logprobs(sft, batch["input_ids"], batch["attention_mask"], P, temperature)
        kl += (kl_penalty(logprobs, sft_logprobs) * batch["response_mask"][:, P:]).sum(-1).tolist()
    rm = score_ids(reward_model, *zip(*samples), tokenizer.pad_id, device=device, dtype=dtype)
    finished = torch.tensor([tokenizer.eos_id in r for _, r in samples])
    rm = torch.where(finished, rm, torch.full_like(rm, no_eos_score))
    return {"text": texts, "rm_score": rm.tolist(), "kl_vs_sft": kl, "length": [len(r) for _, r in samples],
            "gold_reward": [task["gold"](p, t) for p, t in zip(prompts, texts)] if task and task["gold"] else None,
            "well_formed": [float(task["well_formed"](p, t)) for p, t in zip(prompts, texts)]
            if task and task["well_formed"] else None}


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
    if judged["well_formed"] is not None:
        row["well_formed"] = mean(judged["well_formed"])
    return row




# ----------------------------------------------------------------------------- the recipe

STAGES = ["tokenizer", "sft", "rm", "split", "dpo", "ppo", "eval"]


def mean_gold(policy, tokenizer, task, run, seed, show=0):
    """Mean gold reward of one sample per evaluation prompt; prints the first `show` samples."""
    samples = sample_responses(policy, tokenizer, task["eval"], run.max_new_tokens, run.eval_temperature,
                               seed, run.device, run.dtype)
    texts = [tokenizer.decode(r) for _, r in samples]
    golds = [task["gold"](p, t) for p, t in zip(task["eval"], texts)]
    for p, t, gr in list(zip(task["eval"], texts, golds))[:show]:
        tqdm.write(f"  {p.strip()!r}\n    -> {t!r}  gold {gr:+.2f}")
    return sum(golds) / len(golds)


def pipeline(run, cfgs, out, seed, methods, init=None, shared=None, tau=None):
    """The stages of `methods` (names in METHODS) in the paper's order, into the run folder `out`:
    tokenizer -> sft -> rm -> split -> each method's DPO and PPO stages -> eval.

    run: the run's settings (train.RunConfig); cfgs: the stage configs by stage kind; init: a
    train.Init or None; shared: stage names whose folders live in another run folder (sweeps).
    Returns the results, or None when --stages ends before eval.
    """
    tau = run.label_noise if tau is None else tau
    task = data.load_task(run, seed, tau, tqdm.write)
    runner = Runner(out, seed, STAGES, run.stage_list, run.force_list, shared)
    device, dtype, R = run.device, run.dtype, run.max_new_tokens
    tok_path = os.path.join(runner.path("tokenizer"), "tokenizer.json")
    # what every stage depends on: the task, the weights' content (not their path), the longest response
    task_key = {**task["key"], "init": init.sha256 if init else None, "max_new_tokens": R}
    model_shape = dict(n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd, block_size=run.block_size)
    try:
        def tokenizer_stage(folder):
            if init:
                shutil.copyfile(init.tokenizer, tok_path + ".tmp")
                os.replace(tok_path + ".tmp", tok_path)
                return {"from": init.tokenizer}
            data.Tokenizer.train([p + r for p, r in task["sft"]] + task["eval"], run.vocab_size).save(tok_path)
            return {}
        runner.run("tokenizer", "tokenizer", {**task_key, "vocab": run.vocab_size}, [], tokenizer_stage)
        tokenizer = data.Tokenizer.load(tok_path)
        if run.data:
            data.report_long_prompts(task, tokenizer, init.block_size if init else run.block_size, R, run.data, tqdm.write)

        def sft_stage(folder):
            model = (load_gpt(init.path, device) if init else
                     GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **model_shape)).to(device))
            before = mean_gold(model, tokenizer, task, run, seed) if task["gold"] else None
            loss = train_sft(model, tokenizer, task["sft"], cfgs["sft"], folder, R, device, dtype, seed)
            save_checkpoint(model, folder)
            if not task["gold"]:
                return {"final_loss": loss}
            after = mean_gold(model, tokenizer, task, run, seed, show=4)
            floor = task["entropy_floor"]([p for p, _ in task["sft"]], lambda r: len(data.encode_response(tokenizer, r)[:R]))
            tqdm.write(f"sft: mean gold reward on {len(task['eval'])} held-out prompts {after:+.3f} "
                       f"(untrained model {before:+.3f}); final loss {loss:.3f}, the task's floor {floor:.3f}")
            return {"final_loss": loss, "entropy_floor": floor, "gold_untrained": before, "gold_sft": after}
        runner.run("sft", "sft", {**task_key, "model": model_shape, "cfg": cfgs["sft"]}, ["tokenizer"], sft_stage)

        def rm_stage(folder):
            model, _ = load_checkpoint(runner.path("sft"), kind="scalar", device=device)
            return train_reward_model(model, tokenizer, task["pref"], task["held_out"], task["sft"][:512],
                                      cfgs["rm"], folder, R, device, dtype, seed)
        runner.run("rm", "rm", {"tau": tau, "cfg": cfgs["rm"]}, ["sft"], rm_stage)
        split = runner.run("split", "split", {"cfg": cfgs["split"]}, ["rm"], lambda folder: split_stage(
            runner.path("rm"), task["pref"], cfgs["split"], folder, tokenizer, R, device, dtype))

        # DPO's curve of held-out gold: where a policy starts to hack shows before the end
        probe_task = {**task, "eval": task["eval"][:64]}
        probe = (lambda policy: {"gold": mean_gold(policy, tokenizer, probe_task, run, seed)}) if task["gold"] else None
        policies = {"sft": "sft", **{method: method_stages(method)[1] for method in methods}}
        # stage 1 of every method, then stage 2: a run asked to stop after dpo has all its DPO stages
        stages = sorted((s for method in methods for s in method_stages(method)[0]), key=lambda s: s[1] == "ppo")
        for name, kind, recipe in stages:
            subset = select(task["pref"], runner.path("split"), recipe.get("pairs") or recipe["prompts"], seed)
            if kind == "dpo":
                fn = lambda folder, subset=subset: dpo_stage(
                    runner.path("sft"), runner.path("sft"), subset, task["held_out"], cfgs["dpo"], folder,
                    tokenizer, R, device, dtype, seed, probe)
                runner.run(name, kind, {"cfg": cfgs["dpo"], **recipe}, ["sft", "split"], fn)
            else:
                fn = lambda folder, subset=subset, recipe=recipe: ppo_stage(
                    runner.path(recipe["init"]), runner.path(recipe["reference"]), runner.path("rm"),
                    [r["prompt"] for r in subset], cfgs["ppo"], folder, tokenizer, R, device, dtype, seed,
                    task["gold"])
                upstream = sorted({recipe["init"], recipe["reference"]}) + ["rm", "split"]
                runner.run(name, kind, {"cfg": cfgs["ppo"], **recipe}, upstream, fn)

        def eval_stage(folder):
            sft, _ = load_checkpoint(runner.path("sft"), kind="gpt", device=device)
            reward_model = load_reward_model(runner.path("rm"), device)
            judged = {}
            for method, stage in policies.items():
                policy, _ = load_checkpoint(runner.path(stage), kind="gpt", device=device)
                judged[method] = evaluate_policy(policy, sft, reward_model, tokenizer, task["eval"], R,
                                                 run.eval_temperature, seed, task, cfgs["ppo"].no_eos_score,
                                                 device, dtype)
            write_json(os.path.join(folder, "samples.json"), [{"prompt": p, **{m: judged[m]["text"][i] for m in judged}}
                                                               for i, p in enumerate(task["eval"][:50])])
            return {m: summarize(judged[m], judged["sft"]) for m in judged}
        settings = {"methods": policies, "seed": seed, "prompts": len(task["eval"]), "temperature": run.eval_temperature}
        table = runner.run("eval", "eval", settings, sorted(set(policies.values())) + ["rm"],
                           eval_stage)
    except Stop:
        return None

    stage_seconds = {m: sum(runner.seconds.get(n, 0) for n, _, _ in method_stages(m)[0]) for m in policies}
    results = {"methods": {m: {**row, "seconds": stage_seconds[m]} for m, row in table.items()},
               "reference": task["reference"](task["eval"]) if task["reference"] else None,
               "win_rate_judge": "gold reward" if task["gold"] else "the training reward model (which PPO optimised)",
               "split": {k: split.get(k) for k in ("delta", "easy", "hard", "easy_label_agreement", "hard_label_agreement")},
               "seconds": runner.seconds, "reused": runner.reused,
               "config": {"preset": run.preset, "seed": seed, "label_noise": tau, "max_new_tokens": R,
                          "eval_prompts": len(task["eval"]), "eval_temperature": run.eval_temperature,
                          **{k: dataclasses.asdict(v) for k, v in cfgs.items()}}}
    write_json(os.path.join(out, "results.json"), results)
    write_table(results, os.path.join(out, "results.md"))
    if run.export_hf:  # each final policy as a GPT-2 folder that transformers loads
        for method, stage in policies.items():
            folder = os.path.join(out, "hf", method)
            save_hf_gpt2(load_checkpoint(runner.path(stage), kind="gpt")[0], folder, eos_id=tokenizer.eos_id)
            tokenizer.save(os.path.join(folder, "tokenizer.json"))
        tqdm.write(f"GPT-2 folders for transformers: {os.path.join(out, 'hf')}/{{{','.join(policies)}}}")
    return results
