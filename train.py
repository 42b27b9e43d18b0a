"""The command line: python train.py runs the whole MPO pipeline (mpo.pipeline) on the built-in task;
torchrun --nproc_per_node N train.py runs it data parallel (plumbing/distributed.py).

Every setting is a field of RunConfig or of a stage's config, and every field is a flag; a preset
is a RunConfig. Stages: tokenizer, sft, rm, split, dpo, ppo, judge (real data), eval. Each writes a folder of the run
folder and a done.json last; a stage whose done.json matches its settings and inputs is reused.
"""
import dataclasses
import os
import sys
from dataclasses import dataclass, field

import torch

from plumbing import checks, distributed
import training
from data import FORMATS
from plumbing.files import UserError, write_json
from plumbing.hf import check_init, export_hf
from plumbing.hf_reward import check_reward_model
from plumbing.checks import device_problem, problem, setting, settings, unknown
from dpo import DPOConfig
from lora import LORA_STAGES, TARGETS, LoRAConfig, missing_target
from model import GPT, GPTConfig
from mpo import ABLATIONS, BASELINES, METHODS, STAGES, SplitConfig, pipeline
from ppo import PPOConfig
from plumbing.report import aggregate, write_table
from reward import RMConfig
from sft import SFTConfig
from plumbing.runs import locked
from training import NonFiniteError, default_dtype

SWEEP_FIELDS = {"noise": "label_noise", "bias": "annotator_bias", "flip": "label_flips"}  # what a sweep of the labels changes
STAGE_CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "split": SplitConfig, "dpo": DPOConfig, "ppo": PPOConfig,
                 "lora": LoRAConfig}  # lora: flags --lora-*, the adapters of the stages it names


@dataclass
class RunConfig:
    """One run: where it writes, what it runs, the model and task shapes, and each stage's config."""
    out: str = setting("runs/mpo", "the run folder", kind="run folder")
    preset: str = setting("tiny", "tiny (2-core CPU), micro (smoke test), gpt2 (124M, one GPU), gpu24 (--init's "
                          "model with adapters on one 24 GB GPU)", kind="preset")
    stages: str = setting(",".join(STAGES), "comma list of stages to run: " + ",".join(STAGES), kind="stages")
    force: str = setting("", "comma list of stages to redo even if complete", kind="stages")
    seed: int = setting(0, "seed of the task, the weights and the sampling", range="[0, inf)")
    seeds: int = setting(1, "repeat everything with seeds seed..seed+N-1; mean and spread", range="[1, inf)")
    device: str = setting("", "cpu or cuda (default: cuda when there is one)", kind="device")
    dtype: str = setting("", "default: bf16 on CUDA, fp32 on CPU", choices=["fp32", "bf16", "fp16"])
    compile: bool = setting(False, "torch.compile the training forward passes (pays on a GPU)")
    grad_accum: int = setting(1, "SFT, RM and DPO: micro-batches per optimizer step (per rank under torchrun), "
                              "so a batch fits in less memory", range="[1, inf)")
    checkpointing: bool = setting(False, "activation checkpointing: every trained model recomputes each transformer "
                                  "block in the backward pass (less memory, about a third more compute)")
    save_minutes: float = setting(0.0, "also save a stage's resumable step state once this many minutes have passed "
                                  "since its last (0: by the --*-save-every step counts alone)", range="[0, inf)")
    compare: bool = setting(False, "also train the baselines: " + ",".join(BASELINES))
    ablations: str = setting("", "comma list of further rows: ablations from " + ",".join(ABLATIONS) + " (or all), or "
                             "single baselines", kind="ablations")
    delta_sweep: str = setting("", "comma list of deltas: MPO once per delta (SFT and RM shared)", kind="numbers",
                               range="(-inf, inf)")
    noise_sweep: str = setting("", "comma list of label-noise taus: every method (and DPO) once per tau, SFT shared, "
                               "the easy set kept at the main run's size", kind="numbers", range="(0, inf)")
    bias_sweep: str = setting("", "comma list of biased annotators' shares: every method (and DPO) once per share, "
                              "SFT shared, the easy set kept at the main run's size", kind="numbers", range="[0, 1]")
    flip_sweep: str = setting("", "comma list of label flip rates: every method (and DPO) once per rate, SFT shared, "
                              "the easy set kept at the main run's size", kind="numbers", range="[0, 0.5)")
    label_noise: float = setting(1.0, "tau of the built-in labels: P(a > b) = sigmoid((r*(a) - r*(b)) / tau)",
                                 range="(0, inf)")
    label_flips: float = setting(0.0, "built-in task: each training pair's label is flipped with this probability, "
                                 "whatever the gold gap and the annotator", range="[0, 0.5)")
    annotator_bias: float = setting(0.0, "built-in task: the share of labels from biased annotators, who prefer "
                                    "the longer (or more polite) response whatever its correctness", range="[0, 1]")
    bias_kind: str = setting("longer", "what biased annotators prefer", choices=["longer", "polite"])
    on_policy_pairs: bool = setting(False, "built-in task: preference pairs from the SFT demonstrators (ablation; by "
                                    "default they come from other responders, as in HH-RLHF)")
    data: str = setting("", "a preference file (hh, tldr or jsonl, plain or gzip) instead of the built-in task; "
                        "a tenth of it is held out, and --judge-fraction of the rest trains the judge", kind="file")
    format: str = setting("auto", "the format of --data", choices=["auto", *FORMATS])
    chat_template: str = setting("auto", "how conversations (chat lines, and HH-RLHF dialogues) of --data become text: "
                                 "auto (the chat template beside --init's tokenizer, when it has one), none (the "
                                 "HH-RLHF text form), or a Jinja template file", kind="chat template")
    eval_data: str = setting("", "held-out preference file for evaluation (with --data)", kind="file")
    sft_data: str = setting("", "demonstrations for SFT: {prompt, response} lines or a preference file's "
                            "chosen side (default: the chosen side of --data)", kind="file")
    judge_fraction: float = setting(0.2, "with --data: the share of its training pairs held out for the evaluation's "
                                    "judge, a second reward model that no policy and no training reward model sees",
                                    range="(0, 1)", why="the judge and the reward model each need pairs")
    init: str = setting("", "start SFT from this folder: a Hugging Face folder of the GPT-2, Llama or Qwen2 layout "
                        "(config.json, model.safetensors or its shards, tokenizer.json; end-of-sequence and padding "
                        "tokens from its configs) or a checkpoint of this project", kind="folder")
    reward_model: str = setting("", "a Hugging Face sequence classifier of one label (GPT2-, Llama- or "
                                "Qwen2ForSequenceClassification, with its tokenizer.json) as the reward model of "
                                "the split, PPO and the evaluation: the rm stage is skipped", kind="folder")
    export_hf: bool = setting(False, "also write each final policy as a Hugging Face folder of its layout (GPT-2, "
                              "llama or qwen2), RUN/hf/METHOD, and the reward model as a sequence classifier, "
                              "RUN/hf/reward_model")
    # the model and the task (the preset's)
    n_layer: int = setting(2, "transformer blocks", range="[1, inf)")
    n_head: int = setting(4, "attention heads", range="[1, inf)")
    n_embd: int = setting(128, "width", range="[1, inf)")
    block_size: int = setting(128, "context: longest prompt + response", range="[2, inf)")
    vocab_size: int = setting(1024, "BPE vocabulary trained on the task's text (not with --init)", range="[258, inf)",
                              why="the 256 bytes and 2 special tokens come first")
    n_sft: int = setting(4000, "built-in task: SFT demonstrations", range="[1, inf)",
                         why="SFT and centring the reward need a demonstration")
    n_pref: int = setting(2000, "built-in task: preference pairs", range="[2, inf)",
                          why="the split needs an easy and a hard pair")
    max_new_tokens: int = setting(48, "longest response, in training, sampling and scoring", range="[1, inf)")
    eval_prompts: int = setting(0, "evaluate on at most this many held-out prompts (0: all)", range="[0, inf)")
    eval_temperature: float = setting(1.0, "sampling temperature of the evaluation", range="(0, inf)",
                                      why="temperature 0 is greedy: judged besides, in the greedy column")
    eval_samples: int = setting(4, "samples per evaluation prompt (and one greedy answer)", range="[1, inf)")
    eval_split: str = setting("test", "built-in task: evaluate on the test prompts (reporting) or the validation "
                              "prompts (choosing settings)", choices=["test", "valid"])
    # each stage's hyperparameters, flags --sft-*, --rm-*, --dpo-*, --ppo-* and --delta etc. for split
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    # derived from the fields above, never set
    @property
    def stage_list(self):
        return [s for s in self.stages.split(",") if s]

    @property
    def force_list(self):
        return [s for s in self.force.split(",") if s]

    @property
    def methods(self):
        extra = ABLATIONS if self.ablations == "all" else [a for a in self.ablations.split(",") if a]
        # a sweep of the labels compares DPO on the easy pairs (stage 1) with DPO on all of them
        dpo = ["dpo"] if self.noise_sweep or self.bias_sweep or self.flip_sweep else []
        wanted = set(extra + dpo + (BASELINES if self.compare else []))
        return [m for m, row in METHODS.items() if m != "sft" and (row.role == "method" or m in wanted)]

    @property
    def sweeps(self):
        return {"delta": [float(x) for x in self.delta_sweep.split(",") if x],
                "noise": [float(x) for x in self.noise_sweep.split(",") if x],
                "bias": [float(x) for x in self.bias_sweep.split(",") if x],
                "flip": [float(x) for x in self.flip_sweep.split(",") if x]}

    def stage_configs(self):
        return {name: getattr(self, name) for name in STAGE_CONFIGS}


# tiny fits the whole pipeline in 5 minutes on 2 CPU cores; micro is a smoke test; gpt2 is one GPU
PRESETS = {
    "tiny": RunConfig(),
    "micro": RunConfig(n_layer=2, n_head=2, n_embd=64, block_size=96, vocab_size=512, n_sft=600, n_pref=300,
                       max_new_tokens=32, eval_prompts=48,
                       sft=SFTConfig(steps=150, batch_size=16, lr=3e-3, warmup=10),
                       rm=RMConfig(epochs=3, batch_size=16, lr=1e-3, warmup=3),
                       dpo=DPOConfig(epochs=1, batch_size=16, lr=1e-4, warmup=3),
                       ppo=PPOConfig(iterations=8, rollouts=16, sample_every=0)),
    "gpt2": RunConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, n_sft=20000, n_pref=10000,
                      max_new_tokens=64, sft=SFTConfig(steps=1500, lr=3e-4, warmup=100), rm=RMConfig(lr=1e-5),
                      dpo=DPOConfig(lr=5e-6), ppo=PPOConfig(iterations=200, lr=1e-6, critic_lr=1e-5, kl_coef=0.5)),
}
# one 24 GB GPU and a model of your own (--init, e.g. Qwen2.5-1.5B): adapters of rank 16 on every stage,
# bf16, checkpointing, at the sizes bench/memory.py measures (PPO 4 epochs x 4 minibatches of 16 rollouts);
# learning rates of the usual LoRA recipes (adapters take larger steps than full weights)
PRESETS["gpu24"] = dataclasses.replace(
    PRESETS["gpt2"], dtype="bf16", checkpointing=True, lora=LoRAConfig(rank=16, alpha=32.0, stages="sft,rm,dpo,ppo"),
    sft=SFTConfig(steps=1500, lr=2e-4, warmup=100), rm=RMConfig(lr=5e-5), dpo=DPOConfig(lr=5e-6),
    ppo=PPOConfig(iterations=200, epochs=4, minibatches=4, lr=1e-5, critic_lr=1e-4, kl_coef=0.5, save_every=0),
    save_minutes=10.0)  # step states by time: a kill loses at most 10 minutes, and saving costs no iteration


# ----------------------------------------------------------------------------- flags

PRESET_FIELDS = {f for p in PRESETS.values() for f in dataclasses.asdict(p) if getattr(p, f) != getattr(RunConfig(), f)}


def parse_args(argv=None):
    """The command line -> a checked RunConfig: the preset's values, then the flags given."""
    p = checks.OneLineParser(description="MPO: reward-gap split, DPO on the easy pairs, then PPO on the hard "
                                  "prompts with the DPO model as reference. With no flags: the whole pipeline "
                                  "on the built-in task with the tiny preset.")
    checks.add_flags(p, RunConfig, "", "run", PRESET_FIELDS)
    for name, cls in STAGE_CONFIGS.items():
        checks.add_flags(p, cls, "" if name == "split" else f"{name}-", f"{name} stage", PRESET_FIELDS)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "tiny")
    if preset not in PRESETS:
        p.error(f"--preset {preset}: {KINDS['preset'](preset)}")
    base = PRESETS[preset]
    stages = {name: dataclasses.replace(getattr(base, name), **{
        f.name: given.pop(f"{'' if name == 'split' else name + '_'}{f.name}") for f in dataclasses.fields(cls)
        if f"{'' if name == 'split' else name + '_'}{f.name}" in given}) for name, cls in STAGE_CONFIGS.items()}
    run = dataclasses.replace(base, **given, **stages)
    run = dataclasses.replace(run, device=run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not device_problem(run.device):  # else check() names the device
        run = dataclasses.replace(run, dtype=run.dtype or default_dtype(run.device))
    error = check(run)
    if error:
        p.error(error)
    return run


# ----------------------------------------------------------------------------- checks (plumbing/checks.py)

KINDS = {**checks.KINDS,  # a kind -> what is wrong with a value of it, or None
         "preset": lambda v: None if v in PRESETS else f"not a preset: choose from {', '.join(PRESETS)}",
         "stages": lambda v: unknown(v, STAGES, "stage"),
         "ablations": lambda v: unknown(v, [*ABLATIONS, *BASELINES, "all"], "row"),
         "lora targets": lambda v: unknown(v, TARGETS, "projection") or (None if v.strip(",") else "name a projection"),
         "lora stages": lambda v: unknown(v, LORA_STAGES, "stage") or (None if v.strip(",") else "name a stage")}


BUILTIN_TASK = ["n_sft", "n_pref", "label_noise", "noise_sweep", "bias_sweep", "annotator_bias", "bias_kind",
                "on_policy_pairs", "eval_split", "label_flips", "flip_sweep"]  # settings of the built-in task: meaningless with --data
MODEL_SHAPE = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size"]  # --init's config.json has its own


def check(run):
    """What is wrong with the flags, in one line, or None: each setting alone, then together."""
    for flag, value, meta in settings(run):
        wrong = problem(value, meta, KINDS)
        if wrong:
            return f"{flag} {value if value != '' else repr(value)}: {wrong}"
    if not run.stage_list:
        return "--stages: name at least one stage"
    if "all" in run.ablations.split(",") and run.ablations != "all":
        return f"--ablations {run.ablations}: all stands alone"
    wrong = data_conflict(run) or shape_conflict(run) or batch_conflict(run) or adapter_conflict(run)
    if wrong:
        return wrong
    for flag, given in (("--export-hf", run.export_hf), ("--delta-sweep", run.delta_sweep),
                        ("--noise-sweep", run.noise_sweep), ("--bias-sweep", run.bias_sweep),
                        ("--flip-sweep", run.flip_sweep)):
        if given and "eval" not in run.stage_list:
            return f"{flag} runs after the eval stage: add eval to --stages"
    return None


def changed(run, names):
    """The flags of `names` whose values differ from the preset's."""
    return ["--" + n.replace("_", "-") for n in names if getattr(run, n) != getattr(PRESETS[run.preset], n)]


def data_conflict(run):
    """The task's settings against each other: --data against the built-in task's, --init's shape."""
    preset = PRESETS[run.preset]
    if (run.eval_data or run.sft_data) and not run.data:
        return "--eval-data and --sft-data need --data"
    if run.chat_template not in ("auto", "none") and not (run.data and run.init):
        return (f"--chat-template {run.chat_template} renders the conversations of --data with the special tokens of "
                f"--init's tokenizer: give {'--data' if not run.data else '--init'}")
    if run.format != "auto" and not run.data:
        return f"--format {run.format} is the format of --data: give --data"
    if run.judge_fraction != preset.judge_fraction and not run.data:
        return (f"--judge-fraction {run.judge_fraction:g} holds out pairs of --data for the judge (the built-in task "
                "judges with its gold reward): give --data")
    if run.data and changed(run, BUILTIN_TASK):
        return f"{changed(run, BUILTIN_TASK)[0]} shapes the built-in task: not with --data"
    if run.data and any(METHODS[m].split == "gold" for m in run.methods):
        return "gold_split splits on the built-in task's gold reward: not with --data"
    if run.init and changed(run, MODEL_SHAPE):
        return f"{changed(run, MODEL_SHAPE)[0]}: the model's shape comes from --init's config.json: not with --init"
    if run.bias_kind != preset.bias_kind and not (run.annotator_bias or run.bias_sweep):
        return f"--bias-kind {run.bias_kind} says what biased annotators prefer: it needs --annotator-bias above 0"
    return None


def shape_conflict(run):
    """The model's shape, the response length and the easy set's size against each other."""
    if not run.init and run.n_embd % run.n_head:
        return f"--n-embd {run.n_embd} is not a multiple of --n-head {run.n_head}"
    if not run.init and run.max_new_tokens >= run.block_size:
        return f"--max-new-tokens {run.max_new_tokens} leaves no room for the prompt in --block-size {run.block_size}"
    easy = round(run.split.easy_fraction * run.n_pref)
    if not run.data and run.split.easy_fraction > 0 and not 0 < easy < run.n_pref:
        return (f"--easy-fraction {run.split.easy_fraction} of --n-pref {run.n_pref} pairs leaves the "
                f"{'easy' if easy == 0 else 'hard'} set empty")
    return None


def batch_conflict(run):
    """The batches against the ranks (torchrun) and micro-batches; the losses' settings together."""
    W, ppo = distributed.world_size(), run.ppo
    for name in ("sft", "rm", "dpo"):
        if getattr(run, name).batch_size < W * run.grad_accum:
            return (f"--{name}-batch-size {getattr(run, name).batch_size} is smaller than {W} ranks x --grad-accum "
                    f"{run.grad_accum}: each micro-batch needs a row")
    if ppo.rollouts % W:
        return f"--ppo-rollouts {ppo.rollouts} must split evenly over the {W} ranks"
    if ppo.rollouts // W < ppo.minibatches:
        return (f"--ppo-minibatches {ppo.minibatches} is more than the {ppo.rollouts // W} rollouts of each of "
                f"the {W} ranks (--ppo-rollouts {ppo.rollouts}): a minibatch would be empty")
    if ppo.kl_target and not ppo.kl_coef:
        return "--ppo-kl-target scales --ppo-kl-coef up and down: it needs --ppo-kl-coef above 0"
    if ppo.kl_target and 5 * ppo.kl_horizon <= ppo.rollouts:
        return (f"--ppo-kl-horizon {ppo.kl_horizon}: with --ppo-kl-target, needs more than --ppo-rollouts / 5 = "
                f"{ppo.rollouts / 5:g}, or one update can make the KL coefficient 0 or negative")
    if run.dpo.loss_type.startswith("ipo") and run.dpo.label_smoothing:
        return f"--dpo-label-smoothing is for --dpo-loss-type sigmoid: {run.dpo.loss_type} has none"
    return None


def adapter_conflict(run):
    """The adapters (--lora-*) and activation checkpointing against the model and the stages run."""
    lora, preset = run.lora, PRESETS[run.preset]
    if not lora.rank and lora != dataclasses.replace(preset.lora, rank=0):
        given = next(f.name for f in dataclasses.fields(lora) if getattr(lora, f.name) != getattr(preset.lora, f.name))
        return f"--lora-{given.replace('_', '-')} sets the adapters: it needs --lora-rank above 0"
    if run.preset == "gpu24" and not run.init:
        return "--preset gpu24 trains adapters on a model of your own: give --init (a Hugging Face folder)"
    if lora.applies("sft") and not run.init:
        return "--lora-stages sft: adapters on a randomly initialised model would train little; give --init"
    trains = {"sft", "rm", "dpo", "ppo", "judge"} & set(run.stage_list)
    if run.checkpointing and not trains:
        return f"--checkpointing saves memory in training: --stages {run.stages} trains nothing"
    if lora.rank and not run.init:  # --init's layout is checked when it is loaded (hf.check_init)
        with torch.device("meta"):  # the shapes alone, no memory
            wrong = missing_target(GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8)), lora.targets)
        if wrong:
            return f"--lora-targets {lora.targets}: {wrong}"
    return None


# ----------------------------------------------------------------------------- main

def experiment(run, init, reward=None):
    """pipeline() once per seed, the mean and spread over seeds, then the sweeps."""
    cfgs = run.stage_configs()
    seeds = [run.seed + i for i in range(run.seeds)]
    folder = lambda s: run.out if len(seeds) == 1 else os.path.join(run.out, f"seed-{s}")
    runs = [pipeline(run, cfgs, folder(s), s, run.methods, init, reward=reward) for s in seeds]
    if None in runs:  # --stages stopped before eval
        return
    if run.export_hf:
        for s, results in zip(seeds, runs):
            export_hf(folder(s), results["policies"], init.dtype if init else torch.float32, reward is None)
    if len(runs) > 1:
        agg = aggregate(runs)
        write_json(os.path.join(run.out, "results.json"), agg)
        print(f"mean ± standard deviation over seeds {seeds}:")
        write_table(agg, os.path.join(run.out, "results.md"))
    for sweep, values in run.sweeps.items():
        for v in values:
            sweep_runs = []
            for s, main in zip(seeds, runs):
                if sweep == "delta":  # another split of the same reward model's gaps
                    condition = run, dict(cfgs, split=dataclasses.replace(cfgs["split"], delta=v, easy_fraction=0.0))
                    shared, methods = ["tokenizer", "sft", "rm"], ["mpo"]
                else:  # other labels (noise, or biased annotators): the easy set keeps the main run's size
                    fraction = main["split"]["easy"] / (main["split"]["easy"] + main["split"]["hard"])
                    condition = (dataclasses.replace(run, **{SWEEP_FIELDS[sweep]: v}),
                                 dict(cfgs, split=dataclasses.replace(cfgs["split"], easy_fraction=fraction)))
                    shared, methods = ["tokenizer", "sft"], run.methods
                sweep_runs.append(pipeline(*condition, os.path.join(folder(s), f"{sweep}-{v:g}"), s, methods, init,
                                           {n: folder(s) for n in shared}, reward))
            print(f"{sweep} = {v:g}:")
            write_table(aggregate(sweep_runs), os.path.join(run.out, f"{sweep}-{v:g}.md"))


def main(argv=None):
    run = parse_args(argv)
    run = dataclasses.replace(run, device=distributed.setup(run.device))  # cuda:LOCAL_RANK under torchrun
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 prints, as it alone writes
    training.float32_matmuls(run.device, run.dtype)
    try:
        init = check_init(run.init, run.lora, run.max_new_tokens)
        reward = check_reward_model(run.reward_model)
        with locked(run.out):
            experiment(run, init, reward)
    except UserError as e:  # a file, a folder, a setting: one line, status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    distributed.teardown()


if __name__ == "__main__":
    main()
