"""The command line: python train.py runs the whole MPO pipeline on the built-in task.

Stages: tokenizer, sft, rm, split, dpo, ppo, eval. Each writes a folder of the run folder and a
done.json last; a stage whose done.json matches its settings and inputs is reused next time.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time

import torch
from tqdm import tqdm

import data
import training
from dpo import DPOConfig
from model import (GPT, CheckpointError, GPTConfig, load_checkpoint, load_hf_gpt2, read_config_json, save_checkpoint,
                   save_hf_gpt2)
from mpo import (METHODS, SplitConfig, SplitError, aggregate, dpo_stage, evaluate_policy, file_sha256,
                 method_stages, ppo_stage, sample_responses, select, split_stage, summarize, write_table)
from ppo import PPOConfig
from reward import RMConfig, load_reward_model, train_reward_model
from sft import SFTConfig, train_sft
from task import gold_reward, make_task
from training import NonFiniteError, default_dtype

STAGES = ["tokenizer", "sft", "rm", "split", "dpo", "ppo", "eval"]
CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "split": SplitConfig, "dpo": DPOConfig, "ppo": PPOConfig}

# Presets: tiny fits the whole pipeline in 5 minutes on 2 CPU cores; micro is a smoke test.
PRESETS = {
    "micro": {"model": dict(n_layer=2, n_head=2, n_embd=64, block_size=96), "vocab_size": 512,
              "task": dict(n_sft=600, n_pref=300), "max_new_tokens": 32, "eval_prompts": 48,
              "sft": dict(steps=150, batch_size=16, lr=3e-3, warmup=10), "rm": dict(epochs=3, batch_size=16, lr=1e-3, warmup=3),
              "dpo": dict(epochs=1, batch_size=16, lr=1e-4, warmup=3),
              "ppo": dict(iterations=4, rollouts=16, sample_every=0)},
    "tiny": {"model": dict(n_layer=4, n_head=4, n_embd=128, block_size=128), "vocab_size": 1024,
             "task": dict(n_sft=4000, n_pref=2000), "max_new_tokens": 48, "eval_prompts": 0},
    "gpt2": {"model": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), "vocab_size": 1024,
             "task": dict(n_sft=20000, n_pref=10000), "max_new_tokens": 64, "eval_prompts": 0,
             "sft": dict(steps=1500, lr=3e-4, warmup=100), "rm": dict(lr=1e-5), "dpo": dict(lr=5e-6),
             "ppo": dict(iterations=200, lr=1e-6, critic_lr=1e-5)},
}


# ----------------------------------------------------------------------------- stages and run folders

class StageError(Exception):
    """A stage the command needs but may not run (not in --stages)."""


class Runner:
    """Runs stages into a run folder; reuses a stage whose done.json has the same fingerprint."""

    def __init__(self, out, seed, force=(), shared=None):
        self.out, self.seed, self.force, self.shared = out, seed, set(force), shared or {}
        self.done, self.reused, self.seconds = {}, [], {}

    def path(self, name):
        return os.path.join(self.shared.get(name, self.out), name)

    def run(self, name, settings, upstream, fn, allowed=True):
        """Reuse the stage if complete with this fingerprint; else run it (resuming from its step
        state when one was saved under the same fingerprint)."""
        if name in self.done:  # shared by two methods of this run
            return self.done[name]["summary"]
        folder = self.path(name)
        done_path = os.path.join(folder, "done.json")
        # a stage's fingerprint: its settings and when each of its inputs last finished
        key = json.dumps({"settings": settings, "upstream": [self.done[u]["finished"] for u in upstream]},
                         sort_keys=True, default=str)
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        if os.path.exists(done_path) and name not in self.force:
            done = data.read_json(done_path)
            if done["fingerprint"] == fingerprint:
                self.done[name], self.seconds[name] = done, done["seconds"]
                self.reused.append(name)
                return done["summary"]
        if not allowed:
            raise StageError(f"stage {name} is needed but not complete in {folder}; "
                             f"add it to --stages")
        step_state = self.start(name, folder, fingerprint)
        # the stage's seed: its name, settings and the run's seed, never the upstream timestamps
        seed_key = json.dumps({"name": name, "settings": settings, "seed": self.seed}, sort_keys=True, default=str)
        torch.manual_seed(int(hashlib.sha256(seed_key.encode()).hexdigest()[:8], 16))
        t0 = time.time()
        tqdm.write(f"== {name} -> {folder}")
        try:
            summary = fn(folder)
        except NonFiniteError as e:
            kept = f"; the last step state is kept: {step_state}" if os.path.exists(step_state) else ""
            raise NonFiniteError(f"stage {name}, {e}{kept}") from None
        done = {"fingerprint": fingerprint, "seconds": round(time.time() - t0, 2), "summary": summary,
                "finished": time.time()}
        data.write_json(done_path, done)  # written last: the stage is complete
        if os.path.exists(step_state):
            os.remove(step_state)
        self.done[name], self.seconds[name] = done, done["seconds"]
        return summary

    def start(self, name, folder, fingerprint):
        """Keep the stage's step state only if it was saved under this fingerprint; returns its path."""
        os.makedirs(folder, exist_ok=True)
        started, step_state = os.path.join(folder, "started.json"), os.path.join(folder, "step_state.safetensors")
        if name in self.force or not os.path.exists(started) or data.read_json(started)["fingerprint"] != fingerprint:
            if os.path.exists(step_state):
                os.remove(step_state)  # saved under other settings or inputs: start over
            data.write_json(started, {"fingerprint": fingerprint})
        return step_state


def mean_gold(policy, tokenizer, task, args, device, dtype, show=0):
    prompts = task["eval"]
    samples = sample_responses(policy, tokenizer, prompts, args.max_new_tokens, seed=args.seed, device=device, dtype=dtype)
    texts = [tokenizer.decode(r) for _, r, _ in samples]
    golds = [task["gold"](p, t) for p, t in zip(prompts, texts)]
    for p, t, gr in list(zip(prompts, texts, golds))[:show]:
        tqdm.write(f"  {p.strip()!r}\n    -> {t!r}  gold {gr:+.2f}")
    return sum(golds) / len(golds)


# ----------------------------------------------------------------------------- one run

def load_task(args, seed, tau):
    """The built-in task, or the records of --data with a held-out part (or --eval-data)."""
    if not args.data:
        task = make_task(seed, tau=tau, **args.preset_cfg["task"])
        if args.eval_prompts:
            task["eval"] = task["eval"][:args.eval_prompts]
        return {**task, "gold": gold_reward, "key": {"seed": seed, "task": args.preset_cfg["task"]}}
    log = lambda m: tqdm.write(m)
    records = data.load_preferences(args.data, args.format, log)
    if args.eval_data:
        held_out = data.load_preferences(args.eval_data, args.format, log)
    else:  # a seeded tenth of the file, at most 1000 pairs, never trained on
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n = max(1, min(1000, len(records) // 10))
        held_out, records = [records[i] for i in order[:n]], [records[i] for i in sorted(order[n:])]
        if not records:
            raise data.DataError(f"{args.data}: too few pairs to hold some out; give --eval-data")
    demos = (data.load_demonstrations(args.sft_data, args.format, log) if args.sft_data
             else [(r["prompt"], r["chosen"]) for r in records])
    eval_prompts = list(dict.fromkeys(r["prompt"] for r in held_out))[:args.eval_prompts or 256]
    files = [f for f in (args.data, args.eval_data, args.sft_data) if f]
    key = {"seed": seed, "data": {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}}
    return {"sft": demos, "pref": records, "held_out": held_out, "eval": eval_prompts, "gold": None,
            "key": key}


def report_long_prompts(task, tokenizer, block_size, max_new_tokens, path):
    """One line for the prompts that do not fit the context: they are cut from the left."""
    room = block_size - max_new_tokens
    long = [(r["line"], n) for r in task["pref"] for n in [len(tokenizer.encode(r["prompt"]))] if n > room]
    if long:
        tqdm.write(f"{path}:{long[0][0]}: field 'prompt' has {long[0][1]} tokens, more than the {room} the "
                   f"context leaves; {len(long)} such prompts are cut from the left, keeping the end")


def init_model(path, device):
    """--init: a Hugging Face GPT-2 folder or a checkpoint folder of this project."""
    if "kind" in read_config_json(os.path.join(path, "config.json")):
        return load_checkpoint(path, kind="gpt", device=device)[0]
    return load_hf_gpt2(path, device=device)


def run_pipeline(args, cfgs, out, seed, methods, shared=None, tau=None):
    """tokenizer -> sft -> rm -> split -> the stages of each method -> eval. Returns results."""
    tau = args.label_noise if tau is None else tau
    task = load_task(args, seed, tau)
    runner = Runner(out, seed, args.force, shared)
    device, dtype = args.device, args.dtype
    allowed = lambda kind: kind in args.stages
    last = max(STAGES.index(s) for s in args.stages)  # stages after the last one asked for do not run
    R = args.max_new_tokens
    tok_path = os.path.join(runner.path("tokenizer"), "tokenizer.json")
    task_key = {**task["key"], "init": args.init_sha256}  # the weights' content, not their path
    init_tokenizer = args.init_tokenizer

    def tokenizer_stage(folder):
        if init_tokenizer:
            shutil.copyfile(init_tokenizer, tok_path + ".tmp")
            os.replace(tok_path + ".tmp", tok_path)
            return {"from": init_tokenizer}
        texts = [p + r for p, r in task["sft"]] + task["eval"]
        data.Tokenizer.train(texts, args.preset_cfg["vocab_size"]).save(tok_path)
        return {}
    runner.run("tokenizer", {**task_key, "vocab": args.preset_cfg["vocab_size"]}, [], tokenizer_stage, allowed("tokenizer"))
    tokenizer = data.Tokenizer.load(tok_path)
    block_size = args.init_block_size or args.preset_cfg["model"]["block_size"]
    if args.data:
        report_long_prompts(task, tokenizer, block_size, R, args.data)
    if last < STAGES.index("sft"):
        return None

    def sft_stage(folder):
        if args.init:
            model = init_model(args.init, device)
        else:
            model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **args.preset_cfg["model"])).to(device)
        if not task["gold"]:
            loss = train_sft(model, tokenizer, task["sft"], cfgs["sft"], folder, R, device, dtype, seed)
            save_checkpoint(model, folder)
            return {"final_loss": loss}
        before = mean_gold(model, tokenizer, task, args, device, dtype)
        loss = train_sft(model, tokenizer, task["sft"], cfgs["sft"], folder, R, device, dtype, seed)
        after = mean_gold(model, tokenizer, task, args, device, dtype, show=4)
        tqdm.write(f"sft: mean gold reward on {len(task['eval'])} held-out prompts {after:+.3f} "
                   f"(untrained model {before:+.3f})")
        save_checkpoint(model, folder)
        return {"final_loss": loss, "gold_untrained": before, "gold_sft": after}
    runner.run("sft", {**task_key, "model": args.preset_cfg["model"], "cfg": cfgs["sft"]}, ["tokenizer"], sft_stage, allowed("sft"))

    def rm_stage(folder):
        model, _ = load_checkpoint(runner.path("sft"), kind="scalar", device=device)
        return train_reward_model(model, tokenizer, task["pref"], task["held_out"], task["sft"][:512],
                                  cfgs["rm"], folder, R, device, dtype, seed)
    if last < STAGES.index("rm"):
        return None
    runner.run("rm", {"tau": tau, "cfg": cfgs["rm"]}, ["sft"], rm_stage, allowed("rm"))
    if last < STAGES.index("split"):
        return None
    split = runner.run("split", {"cfg": cfgs["split"]}, ["rm"], lambda folder: split_stage(
        runner.path("rm"), task["pref"], cfgs["split"], folder, tokenizer, device, dtype), allowed("split"))

    if last < STAGES.index("dpo"):
        return None
    policies = {"sft": "sft"}
    for method in methods:
        stages, policies[method] = method_stages(method)
        for name, kind, recipe in stages:
            if kind == "dpo":
                cfg = dataclasses.replace(cfgs["dpo"], **recipe) if method != "mpo" else cfgs["dpo"]
                fn = lambda folder, cfg=cfg: dpo_stage(
                    runner.path("sft"), runner.path("sft"), select(task["pref"], runner.path("split"), cfg.pairs, seed),
                    task["held_out"], cfg, folder, tokenizer, R, device, dtype, seed)
                runner.run(name, {"cfg": cfg}, ["sft", "split"], fn, allowed("dpo"))
            else:
                cfg = dataclasses.replace(cfgs["ppo"], **recipe) if method != "mpo" else cfgs["ppo"]
                inputs = [cfg.init, cfg.reference]
                fn = lambda folder, cfg=cfg: ppo_stage(
                    runner.path(cfg.init), runner.path(cfg.reference), runner.path("rm"),
                    [r["prompt"] for r in select(task["pref"], runner.path("split"), cfg.prompts, seed)],
                    cfg, folder, tokenizer, R, device, dtype, seed)
                runner.run(name, {"cfg": cfg}, sorted(set(inputs)) + ["rm", "split"], fn, allowed("ppo"))

    if last < STAGES.index("eval"):
        return None

    def eval_stage(folder):
        sft, _ = load_checkpoint(runner.path("sft"), kind="gpt", device=device)
        reward_model, offset = load_reward_model(runner.path("rm"), device)
        judged = {}
        for method, stage in policies.items():
            policy, _ = load_checkpoint(runner.path(stage), kind="gpt", device=device)
            judged[method] = evaluate_policy(policy, sft, reward_model, offset, tokenizer, task["eval"], R,
                                             cfgs["ppo"].temperature, seed, task["gold"], device, dtype)
        data.write_json(os.path.join(folder, "samples.json"),
                        [{"prompt": p, **{m: judged[m]["text"][i] for m in judged}} for i, p in enumerate(task["eval"][:50])])
        return {m: summarize(judged[m], judged["sft"]) for m in judged}
    final_stages = sorted({s for s in policies.values()})
    table = runner.run("eval", {"methods": policies, "seed": seed}, final_stages + ["rm"], eval_stage, allowed("eval"))

    stage_seconds = {m: sum(runner.seconds.get(n, 0) for n, _, _ in method_stages(m)[0]) for m in policies}
    results = {"methods": {m: {**row, "seconds": stage_seconds[m]} for m, row in table.items()},
               "split": {k: split.get(k) for k in ("delta", "easy", "hard", "easy_label_agreement", "hard_label_agreement")},
               "seconds": runner.seconds, "reused": runner.reused,
               "config": {"preset": args.preset, "seed": seed, "label_noise": tau,
                          **{k: dataclasses.asdict(v) for k, v in cfgs.items()}}}
    data.write_json(os.path.join(out, "results.json"), results)
    write_table(results, os.path.join(out, "results.md"))
    if args.export_hf:  # each final policy as a GPT-2 folder that transformers loads
        for method, stage in policies.items():
            folder = os.path.join(out, "hf", method)
            save_hf_gpt2(load_checkpoint(runner.path(stage), kind="gpt")[0], folder, eos_id=tokenizer.eos_id)
            tokenizer.save(os.path.join(folder, "tokenizer.json"))
        tqdm.write(f"GPT-2 folders for transformers: {os.path.join(out, 'hf')}/{{{','.join(policies)}}}")
    return results


# ----------------------------------------------------------------------------- the command line

def add_config_flags(parser, prefix, cls):
    group = parser.add_argument_group(f"{prefix or 'split'} stage")
    for f in dataclasses.fields(cls):
        flag = "--" + (f"{prefix}-" if prefix else "") + f.name.replace("_", "-")
        group.add_argument(flag, dest=f"{prefix or 'split'}__{f.name}", type=type(f.default), default=None,
                           help=f"{f.metadata.get('help', '')} (default: {f.default}, or the preset's)")


class OneLineParser(argparse.ArgumentParser):
    """Flag mistakes: one line on stderr and exit status 2, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = OneLineParser(description="MPO: reward-gap split, DPO on the easy pairs, then PPO on the "
                                "hard prompts with the DPO model as reference. With no flags: the whole "
                                "pipeline on the built-in task with the tiny preset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/mpo", help="the run folder")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of stages to run: " + ",".join(STAGES))
    p.add_argument("--preset", default="tiny", help="tiny (2-core CPU), micro (smoke test), gpt2 (124M, one GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task, the weights and the sampling")
    p.add_argument("--seeds", type=int, default=1, help="repeat everything with seeds seed..seed+N-1; mean and spread")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward passes (pays on a GPU)")
    p.add_argument("--label-noise", type=float, default=1.0, help="tau of the built-in labels: P(a > b) = sigmoid((r*(a) - r*(b)) / tau)")
    p.add_argument("--compare", action="store_true", help="also train the DPO and PPO baselines")
    p.add_argument("--ablations", default="", help="comma list from no_selection,reversed,random_split,mpo_ref_sft, or all")
    p.add_argument("--delta-sweep", default="", help="comma list of deltas: MPO once per delta (SFT and RM shared)")
    p.add_argument("--noise-sweep", default="", help="comma list of label-noise taus: MPO and DPO once per tau")
    p.add_argument("--force", default="", help="comma list of stages to redo even if complete")
    p.add_argument("--data", default=None, help="a preference file (hh, tldr or jsonl, plain or gzip) instead of "
                   "the built-in task; a tenth of it is held out")
    p.add_argument("--format", default="auto", choices=["auto", *data.FORMATS], help="the format of --data")
    p.add_argument("--eval-data", default=None, help="held-out preference file for evaluation (with --data)")
    p.add_argument("--sft-data", default=None, help="demonstrations for SFT: {prompt, response} lines or a "
                   "preference file's chosen side (default: the chosen side of --data)")
    p.add_argument("--export-hf", action="store_true", help="also write each final policy as a Hugging Face "
                   "GPT-2 folder, RUN/hf/METHOD (GPT2LMHeadModel.from_pretrained loads it)")
    p.add_argument("--init", default=None, help="start SFT from this folder: Hugging Face GPT-2 layout "
                   "(config.json, model.safetensors, tokenizer.json) or a checkpoint of this project")
    for prefix, cls in CONFIGS.items():
        add_config_flags(p, "" if prefix == "split" else prefix, cls)
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}: choose from {', '.join(PRESETS)}")
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage {unknown[0]!r}: choose from {','.join(STAGES)}")
    ablations = list(METHODS)[5:] if args.ablations == "all" else [a for a in args.ablations.split(",") if a]
    for a in ablations:
        if a not in list(METHODS)[5:]:
            p.error(f"unknown ablation {a!r}: choose from {','.join(list(METHODS)[5:])}")
    args.methods = ["mpo_stage1", "mpo"] + (["dpo", "ppo"] if args.compare else []) + ablations
    args.force = [s for s in args.force.split(",") if s]
    args.dtype = args.dtype or default_dtype(args.device)
    args.preset_cfg = PRESETS[args.preset]
    args.max_new_tokens = args.preset_cfg["max_new_tokens"]
    args.eval_prompts = args.preset_cfg["eval_prompts"]
    if (args.eval_data or args.sft_data) and not args.data:
        p.error("--eval-data and --sft-data need --data")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder")
    try:
        args.delta_sweep, args.noise_sweep = ([float(x) for x in v.split(",") if x]
                                              for v in (args.delta_sweep, args.noise_sweep))
    except ValueError as e:
        p.error(f"--delta-sweep and --noise-sweep take comma lists of numbers ({e})")
    args.init_block_size = args.init_tokenizer = args.init_sha256 = None
    return args


def check_init(args):
    """Load --init once before anything is written: its weights and its tokenizer must agree."""
    if not args.init:
        return
    model = init_model(args.init, "cpu")
    # the tokenizer the weights were trained with: beside them (Hugging Face), or the run's own
    candidates = [os.path.join(args.init, "tokenizer.json"), os.path.join(args.init, "..", "tokenizer", "tokenizer.json")]
    tok_path = next((c for c in candidates if os.path.exists(c)), None)
    if tok_path is None:
        raise data.DataError(f"{args.init}: no tokenizer.json beside the weights; --init needs the tokenizer "
                             "the model was trained with")
    vocab = data.Tokenizer.load(tok_path).vocab_size
    if vocab > model.config.vocab_size:
        raise data.DataError(f"{tok_path}: {vocab} tokens, more than the {model.config.vocab_size} of the "
                             f"model's config.json")
    if args.max_new_tokens >= model.config.block_size:
        raise data.DataError(f"{args.init}/config.json: context {model.config.block_size} leaves no room for prompts")
    args.init_block_size, args.init_tokenizer = model.config.block_size, tok_path
    args.init_sha256 = file_sha256(args.init)


def stage_configs(args):
    cfgs = {}
    for name, cls in CONFIGS.items():
        values = dict(args.preset_cfg.get(name, {}))
        values.update({f.name: getattr(args, f"{name}__{f.name}") for f in dataclasses.fields(cls)
                       if getattr(args, f"{name}__{f.name}") is not None})
        cfgs[name] = cls(**values)
    return cfgs


def main(argv=None):
    args = parse_args(argv)
    training.COMPILE = args.compile
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfgs = stage_configs(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    folder = lambda s: args.out if len(seeds) == 1 else os.path.join(args.out, f"seed-{s}")
    try:
        check_init(args)
        runs = [run_pipeline(args, cfgs, folder(s), s, args.methods) for s in seeds]
        if None in runs:  # --stages stopped before eval
            return
        if len(runs) > 1:
            agg = aggregate(runs)
            data.write_json(os.path.join(args.out, "results.json"), agg)
            print(f"mean ± standard deviation over seeds {seeds}:")
            write_table(agg, os.path.join(args.out, "results.md"))
        for sweep, values in (("delta", args.delta_sweep), ("noise", args.noise_sweep)):
            for v in values:
                sweep_runs = []
                for s in seeds:
                    c = dict(cfgs, split=dataclasses.replace(cfgs["split"], delta=v)) if sweep == "delta" else cfgs
                    shared_names = ["tokenizer", "sft", "rm"] if sweep == "delta" else ["tokenizer", "sft"]
                    shared = {n: folder(s) for n in shared_names}
                    methods = ["mpo"] if sweep == "delta" else ["dpo", "mpo"]
                    sweep_runs.append(run_pipeline(args, c, os.path.join(folder(s), f"{sweep}-{v:g}"), s, methods,
                                                   shared, tau=v if sweep == "noise" else None))
                print(f"{sweep} = {v:g}:")
                write_table(aggregate(sweep_runs), os.path.join(args.out, f"{sweep}-{v:g}.md"))
    except (SplitError, StageError, data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
