"""Mixed Preference Optimization (Gou and Nguyen, arXiv 2403.19443): the paper in one place.

    1. the reward model scores every pair; the gap g = r(x, y_w) - r(x, y_l) splits the data:
       easy = {g > delta}, hard = {g <= delta}                         (split_by_gap)
    2. stage 1: DPO on the easy pairs, reference = SFT                  (dpo_stage)
    3. stage 2: PPO on the hard set's prompts, initialised from the DPO
       policy and with the DPO policy as the KL reference              (ppo_stage)

The baselines and ablations of the paper are rows of METHODS; pipeline() runs the stages of
each method in the paper's order; evaluate.py judges the policies. This file adds no loss: those
live in model.py (log-probs, SFT), reward.py, dpo.py and ppo.py.
"""
import collections
import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm import tqdm

import data
import distributed
from checkpoint import file_sha256, load_checkpoint, load_gpt, save_checkpoint, save_hf_gpt2
from data import atomic_write, read_json, write_json
from dpo import train_dpo
from evaluate import against_mpo, chosen_values, evaluate_policy, mean_gold, summarize
from model import GPT, GPTConfig
from ppo import train_ppo
from reward import fact_accuracy, load_reward_model, score, train_reward_model
from report import plot_curves, plot_histogram, text_histogram, write_table
from sft import train_sft
from task import label_agreement
from runs import Runner, Stop


@dataclass
class SplitConfig:
    """Each field's "range" is what checks.py accepts (an interval: [ and ] include the end)."""
    delta: float = field(default=1.0, metadata={"help": "easy = gap > delta, in reward units: under Bradley-Terry "
                                                "the reward model gives the chosen response sigmoid(delta) "
                                                "chance of winning (delta 1 = 73%%)", "range": "(-inf, inf)"})
    easy_fraction: float = field(default=0.0, metadata={"help": "if > 0, choose delta so that this fraction "
                                                        "of the pairs is easy (overrides --delta)", "range": "[0, 1)"})


class Method(NamedTuple):
    """A method is a recipe: steps in order, each "dpo SUBSET" or "ppo SUBSET", each starting from
    the policy of the step before (the first from SFT). A subset is all, easy, hard, random_easy or
    random_hard (a random split of the same sizes): DPO trains on its pairs, PPO on their prompts.

    reference: the KL reference of each step, "policy" (the policy the step starts from) or "sft";
    a first DPO step starts from SFT, so both mean SFT there.
    split: the gap that splits the pairs, "rm" (the paper: g = r(x, y_w) - r(x, y_l)), "abs" (|g|)
    or "gold" (the task's gold gap, with the rm split's easy size: an upper bound).
    budget: a PPO step's iterations, "pool" (--ppo-iterations times the share of all prompts it
    trains on: every prompt is visited as often, so PPO on the hard set costs less) or "mpo" (as
    many as MPO's stage 2, whatever the pool).
    role: "method" (always run), "baseline" (--compare) or "ablation" (--ablations)."""
    steps: tuple
    reference: str = "policy"
    split: str = "rm"
    budget: str = "pool"
    role: str = "method"


# The paper's comparison and ablations. Adding one is adding a row.
METHODS = {
    "sft":               Method(()),
    "mpo_stage1":        Method(("dpo easy",)),                                         # stage 1 alone
    "mpo":               Method(("dpo easy", "ppo hard")),                              # the paper
    "dpo":               Method(("dpo all",), role="baseline"),                         # DPO on D, reference SFT
    "ppo":               Method(("ppo all",), role="baseline"),                         # PPO on D, from SFT
    "ppo_matched":       Method(("ppo all",), budget="mpo", role="baseline"),           # ... with MPO's rollouts
    "no_selection":      Method(("dpo all", "ppo all"), role="ablation"),               # no data selection
    "reversed":          Method(("dpo hard", "ppo easy"), role="ablation"),             # reversed selection
    "random_split":      Method(("dpo random_easy", "ppo random_hard"), role="ablation"),  # same sizes
    "mpo_ref_sft":       Method(("dpo easy", "ppo hard"), reference="sft", role="ablation"),  # stage 2 vs SFT
    "ppo_hard":          Method(("ppo hard",), role="ablation"),                        # stage 2 alone, from SFT
    "dpo_then_ppo_all":  Method(("dpo easy", "ppo all"), role="ablation"),              # stage 2 on every prompt
    "dpo_then_dpo_hard": Method(("dpo easy", "dpo hard"), role="ablation"),             # offline stage 2
    "abs_gap":           Method(("dpo easy", "ppo hard"), split="abs", role="ablation"),   # split on |g|
    "gold_split":        Method(("dpo easy", "ppo hard"), split="gold", role="ablation"),  # built-in task only
}
BASELINES = [name for name, m in METHODS.items() if m.role == "baseline"]
ABLATIONS = [name for name, m in METHODS.items() if m.role == "ablation"]
SPLITS = {"rm": "split", "abs": "split_abs", "gold": "split_gold"}  # a split's stage


def method_stages(name):
    """The stages that make a method's policy, [(stage name, kind, recipe)], and its final stage.

    A stage's name says what it trains, so two methods that share a stage share its folder: the
    first DPO step is named by its split and pairs ("dpo" is MPO's stage 1), a later step by its
    method ("ppo" is MPO's stage 2)."""
    method = METHODS[name]
    stages, policy = [], "sft"
    for i, step in enumerate(method.steps):
        kind, subset = step.split()
        if i == 0 and kind == "dpo":  # "dpo", "dpo_all", "dpo_gold", ...: shared by the methods that start so
            stage = "_".join(["dpo"] + [method.split] * (method.split != "rm") + [subset] * (subset != "easy"))
        elif name in ("mpo", "ppo"):
            stage = {"mpo": "ppo", "ppo": "ppo_baseline"}[name]
        else:  # "ppo_hard", "ppo_no_selection", "dpo_then_dpo_hard", ...
            stage = name if name.startswith(kind + "_") else f"{kind}_{name}"
        recipe = {"kind": kind, "subset": subset, "init": policy, "reference": policy if method.reference == "policy"
                  else "sft", "split": SPLITS[method.split], **({"budget": method.budget} if kind == "ppo" else {})}
        stages.append((stage, kind, recipe))
        policy = stage
    return stages, policy


# ----------------------------------------------------------------------------- the split

class SplitError(data.UserError):
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


def split_stage(rm_dir, records, cfg, out_dir, tokenizer, max_response, device="cpu", dtype="fp32",
                gap="rm", easy_count=None, kind_of=None):
    """Score every pair, split by gap, and write out_dir/{gaps,easy,hard,summary}.json.

    gap: "rm" (the paper), "abs" (|g|) or "gold" (the built-in task's gold gap). easy_count, if
    given, fixes the easy set's size: the pairs of the largest gaps, ties broken by position.
    kind_of(prompt), if given, names a prompt's kind: the summary counts the kinds of each set."""
    if gap == "gold":
        gaps = torch.tensor([r["gold_chosen"] - r["gold_rejected"] for r in records])
    else:
        reward_model = load_reward_model(rm_dir, device)
        mine = distributed.shard(records)  # data parallel: each rank scores its part of the pairs
        chosen, rejected = (torch.tensor(distributed.gather(score(
            reward_model, tokenizer, [r["prompt"] for r in mine], [r[side] for r in mine], max_response, device,
            dtype).tolist())) for side in ("chosen", "rejected"))
        gaps = reward_gaps(chosen, rejected, "abs" if gap == "abs" else "signed")
    if easy_count is not None:
        order = torch.sort(gaps, descending=True, stable=True).indices
        easy, hard = sorted(order[:easy_count].tolist()), sorted(order[easy_count:].tolist())
        delta = gaps[order[easy_count]].item()  # the largest hard gap
    else:
        delta = delta_for_fraction(gaps, cfg.easy_fraction) if cfg.easy_fraction > 0 else cfg.delta
        easy, hard = split_by_gap(gaps, delta)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "gaps.json"), gaps.tolist())
    write_json(os.path.join(out_dir, "easy.json"), easy)
    write_json(os.path.join(out_dir, "hard.json"), hard)
    summary = {"delta": delta, "easy": len(easy), "hard": len(hard), "gap": gap,
               "win_probability_at_delta": 1 / (1 + math.exp(-delta)),
               "easy_label_agreement": label_agreement([records[i] for i in easy]),
               "hard_label_agreement": label_agreement([records[i] for i in hard]),
               "all_label_agreement": label_agreement(records)}
    if any(r.get("biased") for r in records):  # the labels of biased annotators, by set
        summary["biased_share"] = {name: sum(bool(records[i].get("biased")) for i in subset) / len(subset)
                                   for name, subset in (("easy", easy), ("hard", hard), ("all", range(len(records))))}
    if kind_of:
        summary["kinds"] = {name: dict(sorted(collections.Counter(kind_of(records[i]["prompt"]) for i in subset).items()))
                            for name, subset in (("easy", easy), ("hard", hard))}
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


# ----------------------------------------------------------------------------- the recipe

STAGES = ["tokenizer", "sft", "rm", "split", "dpo", "ppo", "eval"]


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
                atomic_write(tok_path, lambda tmp: shutil.copyfile(init.tokenizer, tmp))
                return {"from": init.tokenizer}
            # trained on training text only: the held-out prompts' wording stays unseen
            texts = [p + r for p, r in task["sft"]] + [r["prompt"] + r["chosen"] for r in task["pref"]]
            data.Tokenizer.train(texts, run.vocab_size).save(tok_path)
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
            summary = train_reward_model(model, tokenizer, task["pref"], task["held_out"], task["sft"][:512],
                                         cfgs["rm"], folder, R, device, dtype, seed)
            if task["answers"]:  # does it know the facts? (README, "With a better reward model")
                summary |= fact_accuracy(model, tokenizer, task["eval"], task["answers"], R, device, dtype)
                tqdm.write(f"rm: the right answer scored above every wrong one on {summary['fact_accuracy']:.0%} "
                           f"of the factual evaluation questions (chance {summary['fact_chance']:.0%})")
            return summary
        runner.run("rm", "rm", {"tau": tau, "cfg": cfgs["rm"]}, ["sft"], rm_stage)
        kind_of = task["kind"]
        split = runner.run("split", "split", {"cfg": cfgs["split"]}, ["rm"], lambda folder: split_stage(
            runner.path("rm"), task["pref"], cfgs["split"], folder, tokenizer, R, device, dtype, kind_of=kind_of))
        stages = [s for method in methods for s in method_stages(method)[0]]
        if "split_abs" in {recipe["split"] for _, _, recipe in stages}:
            runner.run("split_abs", "split", {"cfg": cfgs["split"]}, ["rm"], lambda folder: split_stage(
                runner.path("rm"), task["pref"], cfgs["split"], folder, tokenizer, R, device, dtype, "abs", None, kind_of))
        if "split_gold" in {recipe["split"] for _, _, recipe in stages}:  # the rm split's easy size
            runner.run("split_gold", "split", {}, ["split"], lambda folder: split_stage(
                None, task["pref"], cfgs["split"], folder, tokenizer, R, device, dtype, "gold", split["easy"], kind_of))

        # DPO's curve of held-out gold: where a policy starts to hack shows before the end
        probe_task = {**task, "eval": (task.get("valid") or task["eval"])[:64]}  # validation prompts
        probe = (lambda policy: {"gold": mean_gold(policy, tokenizer, probe_task, run, seed)}) if task["gold"] else None
        policies = {"sft": "sft", **{method: method_stages(method)[1] for method in methods}}
        # a PPO step visits each prompt of its pool as often: its iterations scale with the pool
        share = lambda subset: len(subset) / len(task["pref"])
        mpo_share = share(select(task["pref"], runner.path("split"), "hard"))
        # DPO steps of every method, then PPO: a run asked to stop after dpo has all its DPO stages
        for name, kind, recipe in sorted(stages, key=lambda s: s[1] == "ppo"):
            subset = select(task["pref"], runner.path(recipe["split"]), recipe["subset"], seed)
            init, reference = runner.path(recipe["init"]), runner.path(recipe["reference"])
            upstream = sorted({recipe["init"], recipe["reference"], recipe["split"]})
            if kind == "dpo":
                fn = lambda folder, subset=subset, init=init, reference=reference: dpo_stage(
                    init, reference, subset, task["held_out"], cfgs["dpo"], folder, tokenizer, R, device, dtype,
                    seed, probe)
                runner.run(name, kind, {"cfg": cfgs["dpo"], **recipe}, upstream, fn)
            else:
                iterations = max(1, round(cfgs["ppo"].iterations * (mpo_share if recipe["budget"] == "mpo" else share(subset))))
                cfg = dataclasses.replace(cfgs["ppo"], iterations=iterations)
                fn = lambda folder, subset=subset, init=init, reference=reference, cfg=cfg: ppo_stage(
                    init, reference, runner.path("rm"), [r["prompt"] for r in subset], cfg, folder, tokenizer, R,
                    device, dtype, seed, task["gold"])
                runner.run(name, kind, {"cfg": cfg, **recipe}, upstream + ["rm"], fn)

        def eval_stage(folder):
            sft, _ = load_checkpoint(runner.path("sft"), kind="gpt", device=device)
            reward_model = load_reward_model(runner.path("rm"), device)
            judged, mine = {}, distributed.shard(task["eval"])  # data parallel: each rank judges its part
            for method, stage in policies.items():
                policy, _ = load_checkpoint(runner.path(stage), kind="gpt", device=device)
                part = evaluate_policy(policy, sft, reward_model, tokenizer, mine, R, run.eval_temperature,
                                       seed + distributed.rank(), task, cfgs["ppo"].no_eos_score, run.eval_samples,
                                       device, dtype)
                judged[method] = {key: distributed.gather(values) for key, values in part.items()}
            write_json(os.path.join(folder, "judged.json"), judged)  # per prompt: to recompute any figure
            write_json(os.path.join(folder, "samples.json"), [{"prompt": p, **{m: judged[m]["text"][i] for m in judged}}
                                                               for i, p in enumerate(task["eval"][:50])])
            chosen = chosen_values(task, reward_model, tokenizer, R, cfgs["ppo"].no_eos_score, device, dtype)
            return {"methods": {m: summarize(judged[m], judged["sft"], chosen) for m in judged},
                    "vs_mpo": against_mpo(judged)}
        settings = {"methods": policies, "seed": seed, "prompts": len(task["eval"]), "split": run.eval_split,
                    "temperature": run.eval_temperature, "samples": run.eval_samples}
        table = runner.run("eval", "eval", settings, sorted(set(policies.values())) + ["rm"], eval_stage)
    except Stop:
        return None

    stage_seconds = {m: sum(runner.seconds.get(n, 0) for n, _, _ in method_stages(m)[0]) for m in policies}
    results = {"methods": {m: {**row, "seconds": stage_seconds[m]} for m, row in table["methods"].items()},
               "vs_mpo": table["vs_mpo"], "vs_mpo_over": f"{len(task['eval'])} prompts (one seed: sampling noise only)",
               "reference": task["reference"](task["eval"]) if task["reference"] else None,
               "win_rate_judge": "gold reward" if task["gold"] else "the training reward model (which PPO optimised)",
               "split": {k: split.get(k) for k in ("delta", "easy", "hard", "easy_label_agreement", "hard_label_agreement")},
               "seconds": runner.seconds, "reused": runner.reused,
               "config": {"preset": run.preset, "seed": seed, "label_noise": tau, "annotator_bias": run.annotator_bias,
                          "bias_kind": run.bias_kind, "max_new_tokens": R,
                          "eval_prompts": len(task["eval"]), "eval_temperature": run.eval_temperature,
                          "eval_samples": run.eval_samples, "eval_split": run.eval_split,
                          "on_policy_pairs": run.on_policy_pairs, "world_size": distributed.world_size(),
                          "grad_accum": run.grad_accum,
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
