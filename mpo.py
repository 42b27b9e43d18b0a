"""Mixed Preference Optimization (Gou and Nguyen, arXiv 2403.19443): the paper in one place.

    1. the reward model scores every pair; the gap g = r(x, y_w) - r(x, y_l) splits the data:
       easy = {g > delta}, hard = {g <= delta}                         (split_by_gap)
    2. stage 1: DPO on the easy pairs, reference = SFT                  (dpo_stage)
    3. stage 2: PPO on the hard set's prompts, initialised from the DPO
       policy and with the DPO policy as the KL reference              (ppo_stage)

The baselines and ablations of the paper are rows of METHODS; pipeline() runs the stages of
each method in the paper's order (the stages around the method, SFT, the reward model and the
evaluation, are in stages.py); evaluate.py judges the policies. This file adds no loss: those
live in model.py (log-probs, SFT), reward.py, dpo.py and ppo.py.
"""
import dataclasses
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from tqdm import tqdm

import data
from plumbing.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from plumbing.checks import setting
from plumbing.files import read_json, write_json
from dpo import reference_logps, train_dpo
from lora import AdaptersOff, adapters
from ppo import train_ppo
from plumbing.report import assemble, plot_curves, plot_histogram, text_histogram, write_table
from stages import (Setup, critic_and_reward_model, eval_stage, judge_stage, rm_stage, score_pairs,
                    sft_stage, tokenizer_stage)
from task import split_labels
from plumbing.tokenizer import Tokenizer
from training import Memory, Runtime
from plumbing.runs import Runner, Stop, method_costs, run_record
from plumbing import files


@dataclass
class SplitConfig:
    """Flags --delta and --easy-fraction: where the reward gap splits the pairs."""
    delta: float = setting(1.0, "easy = gap > delta, in reward units: under Bradley-Terry the reward model gives "
                           "the chosen response sigmoid(delta) chance of winning (delta 1 = 73%%)", range="(-inf, inf)")
    easy_fraction: float = setting(0.0, "if > 0, choose delta so that this fraction of the pairs is easy (overrides "
                                   "--delta)", range="[0, 1)")


class Method(NamedTuple):
    """A method is a recipe: steps in order, each "dpo SUBSET" or "ppo SUBSET", each starting from
    the policy of the step before (the first from SFT), and the run-folder stage that holds each
    step. A subset is all, easy, hard, random_easy or random_hard (a random split of the same
    sizes): DPO trains on its pairs, PPO on their prompts. Methods that name the same folder share
    that stage (MPO's stage 1, "dpo", is every method's that starts with DPO on the easy pairs).

    reference: the KL reference of each step, "policy" (the policy the step starts from) or "sft";
    a first DPO step starts from SFT, so both mean SFT there.
    split: the gap that splits the pairs, "rm" (the paper: g = r(x, y_w) - r(x, y_l)), "abs" (|g|)
    or "gold" (the task's gold gap, with the rm split's easy size: an upper bound).
    budget: a PPO step's iterations, "pool" (--ppo-iterations times the share of all prompts it
    trains on: every prompt is visited as often, so PPO on the hard set costs less) or "mpo" (as
    many as MPO's stage 2, whatever the pool).
    role: "method" (always run), "baseline" (--compare) or "ablation" (--ablations).
    dpo_loss: "" (the run's --dpo-* settings), or a DPO loss that knows the labels' flip rate:
    "sigmoid" (conservative DPO) or "robust", its eps the built-in task's true --label-flips."""
    steps: tuple
    folders: tuple
    reference: str = "policy"
    split: str = "rm"
    budget: str = "pool"
    role: str = "method"
    dpo_loss: str = ""


# The paper's comparison and ablations. Adding one is adding a row.
METHODS = {
    "sft":               Method((), ()),
    "mpo_stage1":        Method(("dpo easy",), ("dpo",)),                                  # stage 1 alone
    "mpo":               Method(("dpo easy", "ppo hard"), ("dpo", "ppo")),                 # the paper
    "dpo":               Method(("dpo all",), ("dpo_all",), role="baseline"),              # DPO on D, reference SFT
    "ppo":               Method(("ppo all",), ("ppo_baseline",), role="baseline"),         # PPO on D, from SFT
    "ppo_matched":       Method(("ppo all",), ("ppo_matched",), budget="mpo", role="baseline"),  # ... MPO's rollouts
    # the rows that test the selection run MPO's PPO rollouts, so that only the selection differs
    "no_selection":      Method(("dpo all", "ppo all"), ("dpo_all", "ppo_no_selection"), budget="mpo", role="ablation"),
    "reversed":          Method(("dpo hard", "ppo easy"), ("dpo_hard", "ppo_reversed"), budget="mpo", role="ablation"),
    "random_split":      Method(("dpo random_easy", "ppo random_hard"), ("dpo_random_easy", "ppo_random_split"),
                                budget="mpo", role="ablation"),                            # same sizes
    "abs_gap":           Method(("dpo easy", "ppo hard"), ("dpo_abs", "ppo_abs_gap"), split="abs", budget="mpo",
                                role="ablation"),                                          # split on |g|
    "gold_split":        Method(("dpo easy", "ppo hard"), ("dpo_gold", "ppo_gold_split"), split="gold", budget="mpo",
                                role="ablation"),                                          # built-in task only
    "dpo_then_ppo_all":  Method(("dpo easy", "ppo all"), ("dpo", "ppo_dpo_then_ppo_all"), budget="mpo",
                                role="ablation"),                                          # stage 2 on every prompt
    "no_selection_pool": Method(("dpo all", "ppo all"), ("dpo_all", "ppo_no_selection_pool"),
                                role="ablation"),                                          # ... at its own budget
    "mpo_ref_sft":       Method(("dpo easy", "ppo hard"), ("dpo", "ppo_mpo_ref_sft"), reference="sft",
                                role="ablation"),                                          # stage 2 vs SFT
    "ppo_hard":          Method(("ppo hard",), ("ppo_hard",), role="ablation"),            # stage 2 alone, from SFT
    "dpo_then_dpo_hard": Method(("dpo easy", "dpo hard"), ("dpo", "dpo_then_dpo_hard"), role="ablation"),  # offline
    # DPO on every pair with a loss built for labels flipped at random, told the true flip rate
    "cdpo":              Method(("dpo all",), ("dpo_all_cdpo",), role="ablation", dpo_loss="sigmoid"),  # conservative
    "rdpo":              Method(("dpo all",), ("dpo_all_rdpo",), role="ablation", dpo_loss="robust"),   # robust DPO
}
BASELINES = [name for name, m in METHODS.items() if m.role == "baseline"]
ABLATIONS = [name for name, m in METHODS.items() if m.role == "ablation"]
SPLITS = {"rm": "split", "abs": "split_abs", "gold": "split_gold"}  # a split's stage


def method_stages(name):
    """The stages that make a method's policy, [(folder, kind, recipe)], and its final folder."""
    method = METHODS[name]
    stages, policy = [], "sft"
    for step, folder in zip(method.steps, method.folders):
        kind, subset = step.split()
        recipe = {"kind": kind, "subset": subset, "init": policy, "reference": policy if method.reference == "policy"
                  else "sft", "split": SPLITS[method.split], **({"budget": method.budget} if kind == "ppo" else {}),
                  **({"loss": method.dpo_loss} if method.dpo_loss and kind == "dpo" else {})}
        stages.append((folder, kind, recipe))
        policy = folder
    return stages, policy


# ----------------------------------------------------------------------------- the split

class SplitError(files.UserError):
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
                gap="rm", easy_count=None, kind_of=None, conversations=None):
    """Score every pair, split by gap, and write out_dir/{gaps,easy,hard,summary}.json.

    gap: "rm" (the paper), "abs" (|g|) or "gold" (the built-in task's gold gap). easy_count, if
    given, fixes the easy set's size: the pairs of the largest gaps, ties broken by position.
    kind_of(prompt) names a prompt's kind (the summary counts each set's); conversations: stages.score_pairs."""
    if gap == "gold":
        gaps = torch.tensor([r["gold_chosen"] - r["gold_rejected"] for r in records])
    else:
        chosen, rejected = score_pairs(rm_dir, records, tokenizer, max_response, device, dtype, conversations)
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
               "win_probability_at_delta": 1 / (1 + math.exp(-delta)), **split_labels(records, easy, hard, kind_of)}
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

def policy_at(folder, device, dtype):
    """The policy saved in `folder`, its weights in dtype."""
    return load_checkpoint(folder, "gpt", device, dtype)[0]


def is_ppo(step):
    return step[1] == "ppo"


def reference_of(policy, starts_from_it, load, memory):
    """A stage's frozen KL reference. A policy with adapters that starts from its reference (MPO's
    two stages: starts_from_it) has it already: the policy with its own adapters off (the earlier
    stages' held ones on), exactly the model the stage started from, in no extra memory. Otherwise
    (full fine-tuning, or mpo_ref_sft's SFT reference for a policy that starts from DPO) a second
    model, load(), frozen in the compute dtype."""
    if adapters(policy) and starts_from_it:
        return AdaptersOff(policy)  # the reference is the policy with this stage's adapters off
    return memory.frozen(load())


def dpo_stage(init_dir, reference_dir, records, held_out, cfg, out_dir, tokenizer, max_response,
              device="cpu", dtype="fp32", seed=0, probe=None, memory=Memory(), runtime=Runtime()):
    """Stage 1: DPO from init_dir against the frozen reference_dir (MPO: both SFT, easy pairs)."""
    policy = memory.trained(load_checkpoint(init_dir, "gpt", device, memory.held("dpo"))[0], "dpo")
    # the frozen reference is read once, for its log-probs, and freed before training
    reference = reference_logps(reference_of(policy, init_dir == reference_dir,
                                             partial(policy_at, reference_dir, device, memory.held()), memory),
                                tokenizer, records, held_out, policy.config.block_size, max_response, device, dtype)
    summary = train_dpo(policy, reference, tokenizer, records, held_out, cfg, out_dir, max_response,
                        device, dtype, seed, probe, runtime)
    # with adapters, they alone (load_checkpoint holds them, unmerged, over init_dir's model: stage 2
    # starts from, and is referenced to, this policy as trained)
    save_checkpoint(policy, out_dir, base=init_dir, init_sha256=file_sha256(init_dir),
                    reference_sha256=file_sha256(reference_dir))
    plot_curves(os.path.join(out_dir, "metrics.jsonl"), "step", ["loss", "margin", "accuracy", "gold"],
                os.path.join(out_dir, "curves.png"))
    return summary


def ppo_stage(init_dir, reference_dir, rm_dir, sft_dir, prompts, cfg, out_dir, tokenizer, max_new_tokens,
              device="cpu", dtype="fp32", seed=0, gold=None, memory=Memory(), runtime=Runtime(), conversations=None):
    """Stage 2: PPO from init_dir, KL to reference_dir (MPO: both the DPO policy, hard prompts).

    The critic starts from the reward model (stages.critic_and_reward_model); the reward model and
    the reference stay frozen.
    """
    policy = memory.trained(load_checkpoint(init_dir, "gpt", device, memory.held("ppo"))[0], "ppo")
    reference = reference_of(policy, init_dir == reference_dir, partial(policy_at, reference_dir, device, memory.held()),
                             memory)
    critic, reward_model, is_reward_model = critic_and_reward_model(rm_dir, sft_dir, tokenizer,
                                                                    policy.config.block_size, device, memory,
                                                                    conversations)
    final = train_ppo(policy, reference, reward_model, critic, tokenizer, prompts, cfg,
                      out_dir, max_new_tokens, device, dtype, seed, gold, runtime)
    save_checkpoint(policy, out_dir, base=init_dir, init_sha256=file_sha256(init_dir),
                    reference_sha256=file_sha256(reference_dir))
    plot_curves(os.path.join(out_dir, "metrics.jsonl"), "iteration", ["score", "gold", "kl", "kl_coef"],
                os.path.join(out_dir, "curves.png"), versus=("kl", ["score", "gold"]))
    return {**final, "critic_from": "rm" if is_reward_model else "sft"}


def policy_stages(methods, runner, pairs, cfgs, flips=0.0):
    """Every DPO and PPO stage of `methods`, DPO first (a run asked to stop after dpo has all of
    them): [(name, kind, settings, upstream, the pairs it trains on, its config)]. A PPO step
    visits each prompt of its pool as often, so its iterations scale with the pool's share of the
    pairs; budget "mpo" takes MPO's stage 2's share instead. A DPO step with a loss of its own
    (Method.dpo_loss) takes the labels' true flip rate, `flips`, as its eps."""
    mpo_share = len(select(pairs, runner.path("split"), "hard")) / len(pairs)
    steps = [step for method in methods for step in method_stages(method)[0]]
    out = []
    for name, kind, recipe in sorted(steps, key=is_ppo):
        subset = select(pairs, runner.path(recipe["split"]), recipe["subset"], runner.seed)
        upstream = sorted({recipe["init"], recipe["reference"], recipe["split"]})
        cfg = cfgs[kind]
        if "loss" in recipe:
            cfg = dataclasses.replace(cfg, loss_type=recipe["loss"], label_smoothing=flips)
        if kind == "ppo":
            budget = mpo_share if recipe["budget"] == "mpo" else len(subset) / len(pairs)
            cfg, upstream = dataclasses.replace(cfg, iterations=max(1, round(cfg.iterations * budget))), upstream + ["rm"]
        out.append((name, kind, {"cfg": cfg, **recipe}, upstream, subset, cfg))
    return out


# ----------------------------------------------------------------------------- the recipe

STAGES = ["tokenizer", "sft", "rm", "split", "dpo", "ppo", "judge", "eval"]  # judge: real data only, for eval
TASK_SETTINGS = ["data", "format", "eval_data", "sft_data", "eval_prompts", "eval_split", "n_sft", "n_pref",
                 "annotator_bias", "bias_kind", "on_policy_pairs", "label_flips",
                 "judge_fraction", "chat_template"]  # RunConfig's fields that data.load_task reads


def adapters_in(cfgs, kind):
    """What a stage's fingerprint records of the adapters: the LoRA settings where they apply to it."""
    return {"lora": cfgs["lora"]} if cfgs["lora"].applies(kind) else {}


def gold_probe(setup, prompts, policy):
    """DPO's held-out probe: the gold reward of the policy's samples on validation prompts."""
    return {"gold": setup.mean_gold(policy, prompts=prompts)}


def split_stages(runner, run, cfgs, methods, task, tokenizer, rm):
    """The paper's split, then the ablations' splits on |g| and on the gold gap (with its easy size)."""
    split = partial(split_stage, runner.path("rm"), task["pref"], cfgs["split"], tokenizer=tokenizer,
                    max_response=run.max_new_tokens, device=run.device, dtype=run.dtype, kind_of=task["kind"],
                    conversations=task["conversations"])
    summary = runner.run("split", "split", {"cfg": cfgs["split"]}, rm, partial(split, gap="rm"))
    needed = {recipe["split"] for m in methods for _, _, recipe in method_stages(m)[0]}
    if "split_abs" in needed:
        runner.run("split_abs", "split", {"cfg": cfgs["split"]}, rm, partial(split, gap="abs"))
    if "split_gold" in needed:
        runner.run("split_gold", "split", {}, ["split"], partial(split, gap="gold", easy_count=summary["easy"]))
    return summary


def dpo_and_ppo_stages(runner, run, cfgs, methods, task, setup):
    """Stage 1 and stage 2 of every method, DPO first; DPO logs a held-out gold probe, where hacking
    shows first. Returns the plan (policy_stages)."""
    path, common = runner.path, dict(tokenizer=setup.tokenizer, device=run.device, dtype=run.dtype, seed=setup.seed,
                                     memory=setup.memory, runtime=setup.runtime)
    probe_prompts = (task.get("valid") or task["eval"])[:64]  # validation prompts
    probe = partial(gold_probe, setup, probe_prompts) if task["gold"] else None
    plan = policy_stages(methods, runner, task["pref"], cfgs, run.label_flips)
    for name, kind, settings, upstream, subset, cfg in plan:
        init_dir, reference_dir = path(settings["init"]), path(settings["reference"])
        if kind == "dpo":
            stage = partial(dpo_stage, init_dir, reference_dir, subset, task["held_out"], cfg,
                            max_response=run.max_new_tokens, probe=probe, **common)
        else:
            stage = partial(ppo_stage, init_dir, reference_dir, path("rm"), path("sft"), [r["prompt"] for r in subset],
                            cfg, max_new_tokens=run.max_new_tokens, gold=task["gold"],
                            conversations=task["conversations"], **common)
        runner.run(name, kind, {**settings, **adapters_in(cfgs, kind)}, upstream, stage)
    return plan


def eval_stages(runner, cfgs, methods, task, setup, run):
    """Real data's judge (a second reward model on pairs nothing else saw; the built-in task has its
    gold reward), then the evaluation of SFT and every method's policy -> (table, judge, policies)."""
    path, judge = runner.path, None
    if task["judge"]:
        judge = runner.run("judge", "judge", {"cfg": cfgs["rm"], **adapters_in(cfgs, "rm")}, ["sft"],
                           partial(judge_stage, s=setup, sft_dir=path("sft"), cfg=cfgs["rm"]))
    policies = {"sft": "sft", **{m: method_stages(m)[1] for m in methods}}
    settings = {"methods": policies, "seed": setup.seed, "prompts": len(task["eval"]), "split": run.eval_split,
                "temperature": run.eval_temperature, "samples": run.eval_samples}
    upstream = sorted(set(policies.values())) + ["rm"] + (["judge"] if judge else [])
    table = runner.run("eval", "eval", settings, upstream, partial(
        eval_stage, s=setup, policies={m: path(stage) for m, stage in policies.items()}, rm_dir=path("rm"),
        no_eos_score=cfgs["ppo"].no_eos_score, judge_dir=path("judge") if judge else None))
    return table, judge, policies


def pipeline(run, cfgs, out, seed, methods, init=None, shared=None, reward=None):
    """The stages of `methods` (names in METHODS) in the paper's order, into the run folder `out`:
    tokenizer -> sft -> rm -> split -> each method's DPO and PPO stages -> judge (real data) -> eval.

    run: the run's settings (train.RunConfig); cfgs: the stage configs by stage kind; init: a
    hf.Init or None; shared: {stage name: the run folder that holds it} (sweeps share the main
    run's); reward: a hf_reward.RewardModel (--reward-model) or None. Returns the results, or None
    when --stages ends before eval.
    """
    tau = run.label_noise
    task = data.load_task(seed, tau, tqdm.write, **{k: getattr(run, k) for k in TASK_SETTINGS},
                          tokenizer=init.tokenizer if init else None)
    runner = Runner(out, seed, STAGES, run.stage_list, run.force_list, shared)
    # what every stage depends on: the task, the weights' content (not their path), the longest response
    key = {**task["key"], "init": init.sha256 if init else None, "max_new_tokens": run.max_new_tokens}
    shape = dict(n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd, block_size=run.block_size)
    try:
        runner.run("tokenizer", "tokenizer", {**key, "vocab": run.vocab_size}, [],
                   partial(tokenizer_stage, task=task, vocab_size=run.vocab_size, init=init))
        tokenizer = Tokenizer.load(os.path.join(runner.path("tokenizer"), "tokenizer.json"))
        memory = Memory(cfgs["lora"], run.checkpointing, run.dtype)
        runtime = Runtime(run.compile, run.grad_accum, run.save_minutes)  # in no fingerprint: how, not what
        setup = Setup(task, tokenizer, run.max_new_tokens, run.device, run.dtype, seed, run.eval_temperature,
                      run.eval_samples, memory, runtime)
        if run.data:
            data.report_long_prompts(task, tokenizer, init.block_size if init else run.block_size, run.max_new_tokens,
                                     run.data, tqdm.write)
        runner.run("sft", "sft", {**key, "model": shape, "cfg": cfgs["sft"], **adapters_in(cfgs, "sft")}, ["tokenizer"],
                   partial(sft_stage, s=setup, cfg=cfgs["sft"], shape=shape, init=init))
        if reward:  # --reward-model: no rm stage; what reads it fingerprints its content (and the policy's tokens)
            runner.outside("rm", reward.path, reward.sha256)
        else:
            runner.run("rm", "rm", {"tau": tau, "cfg": cfgs["rm"], **adapters_in(cfgs, "rm")}, ["sft"],
                       partial(rm_stage, s=setup, sft_dir=runner.path("sft"), cfg=cfgs["rm"]))
        split = split_stages(runner, run, cfgs, methods, task, tokenizer, ["rm", "tokenizer"] if reward else ["rm"])
        plan = dpo_and_ppo_stages(runner, run, cfgs, methods, task, setup)
        table, judge, policies = eval_stages(runner, cfgs, methods, task, setup, run)
    except Stop:
        return None
    costs = method_costs({m: method_stages(m)[0] for m in methods}, plan, runner)
    results = assemble(table, costs, runner, task, split, policies, run_record(run, seed, tau, cfgs, len(task["eval"])),
                       judge)
    if reward:
        results["reward_model"] = {"folder": reward.path, "sha256": reward.sha256}
    write_json(os.path.join(out, "results.json"), results)
    write_table(results, os.path.join(out, "results.md"))
    return results
