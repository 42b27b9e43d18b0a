"""TRL's DPO and PPO as anchors for bench/figures.py: one figure per process, never imported by the project.

    python3 -m bench.anchors --install   # TRL 1.16 (DPO), TRL 0.29.1 (PPO) and what they import, under .anchors/
    python3 -m bench.anchors --install --wheels .whl   # the same offline, from wheels (bench/gpu_check.py)
    python3 -m bench.anchors dpo         # TRL 1.16 DPOTrainer pairs/s, reference log-probs precomputed (its best)
    python3 -m bench.anchors ppo         # TRL 0.29.1 PPOTrainer seconds per iteration (after a warm-up one)

Each prints one last line, "TRL <version> <figure> <unit>", which bench/figures.py reads for its dpo and ppo
figures. TRL 1.x ships no PPO and two TRL versions cannot share a process, so each version has its
own folder, put first on sys.path; accelerate, datasets and their dependencies lie in
.anchors/site-packages/deps. torch, transformers and tokenizers are the installed ones (never
upgraded here). The models are transformers' GPT-2 of bench/figures.py's shape (its hf_twin), random
weights; the tokenizer maps one character to one token id, built in code. Everything offline.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ANCHORS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".anchors")
# dill (datasets' fingerprints) pickles a module by value unless its path holds "site-packages"
SITE = os.path.join(ANCHORS, "site-packages")
TRL = {"dpo": "1.16.0", "ppo": "0.29.1"}  # 0.29.1: the last TRL with PPOTrainer (trl.experimental.ppo)
DEPS = ["accelerate==1.15.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "pandas==3.1.1",
        "psutil==7.2.2", "pyarrow==26.0.1", "python-dateutil==2.9.0.post0", "six==1.17.0",
        "xxhash==4.1.0"]  # what TRL imports beyond requirements-dev.txt (dateutil and six: pandas')
FOLDERS = {**{f"trl-{v}": [f"trl=={v}"] for v in TRL.values()}, "deps": DEPS}
FIRST_CHAR = 0x4E00  # token id i is the character chr(FIRST_CHAR + i)


def installed():
    return all(os.path.isdir(os.path.join(SITE, name)) for name in FOLDERS)


def present(pin):
    """Whether pin's distribution is installed already, at any version."""
    from importlib import metadata
    try:
        return bool(metadata.version(pin.split("==")[0]))
    except metadata.PackageNotFoundError:
        return False


def install(wheels=None):
    """pip install --no-deps --target each folder; one already there with the same pins is kept.
    A folder is built beside its place and moved in when complete, so a failed run leaves none.
    wheels: a folder of wheels to install from, offline (a GPU machine without a registry); then a
    dependency the environment has already, at whatever version, is used as it is."""
    for name, pins in FOLDERS.items():
        if wheels and name == "deps":
            pins = [pin for pin in pins if not present(pin)]
        folder = os.path.join(SITE, name)
        pins_file = os.path.join(folder, "PINS")
        if os.path.exists(pins_file) and open(pins_file).read().split() == pins:
            print(f"{folder}: already installed")
            continue
        part = folder + ".partial"
        shutil.rmtree(part, ignore_errors=True)
        offline = ["--no-index", "--find-links", wheels] if wheels else []
        if pins:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline, "--target", part,
                            *pins], check=True)
        os.makedirs(part, exist_ok=True)
        with open(os.path.join(part, "PINS"), "w") as f:
            f.write("\n".join(pins) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(part, folder)
        print(f"{folder}: {' '.join(pins)}")


def use_trl(version):
    """Put one TRL version and the shared dependencies first on sys.path; offline, quiet."""
    sys.path[:0] = [os.path.join(SITE, f"trl-{version}"), os.path.join(SITE, "deps")]
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    import trl
    assert trl.__version__ == version, (trl.__file__, trl.__version__)


def text(ids):
    return "".join(chr(FIRST_CHAR + i) for i in ids)


def tokenizer(vocab, eos_id):
    """One character per token: ids 0..vocab-1, and <pad> = vocab, an id the models never emit."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({**{text([i]): i for i in range(vocab)}, "<pad>": vocab}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    eos = "<pad>" if eos_id == vocab else text([eos_id])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=eos, eos_token=eos)


def gpt2(a, head):
    """bench.hf_twin's model: transformers' GPT-2 of the same shape, no dropout, random weights."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=a.vocab, n_positions=a.positions, n_embd=a.width, n_layer=a.layers,
                                  n_head=a.heads, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, num_labels=1,
                                  bos_token_id=0, eos_token_id=0)
    return getattr(transformers, head)(cfg).to(a.device)


def clock(device):
    """A callback that notes the time at the end of every training step (an iteration in PPO)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        ends = []

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
    return Clock()


def common(a):
    """Device, precision, quiet; no activation checkpointing (TRL's default is on): at these sizes it
    only costs time (DPO ~87 pairs/s with it, ~99 without, at the tiny shape on 2 CPU cores)."""
    return dict(use_cpu=a.device == "cpu", bf16=a.dtype == "bf16", fp16=a.dtype == "fp16", report_to="none",
                save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0, gradient_checkpointing=False)


def dpo(a, out):
    """Steps of B pairs, prompt P + response N tokens (N - 1 random and the eos TRL appends), the
    reference's log-probs precomputed before training; pairs/s over the steps after the first."""
    use_trl(TRL["dpo"])
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    g = torch.Generator().manual_seed(0)
    n = a.batch * (a.steps + 1)
    rand = lambda length: [text(row) for row in torch.randint(0, a.vocab, (n, length), generator=g).tolist()]
    eos = text([0])
    data = Dataset.from_dict({"prompt": rand(a.prompt), "chosen": [s + eos for s in rand(a.new - 1)],
                              "rejected": [s + eos for s in rand(a.new - 1)]})
    args = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps + 1, learning_rate=1e-6,
                     beta=0.1, max_length=a.prompt + a.new, precompute_ref_log_probs=True, **common(a))
    timer = clock(a.device)
    trainer = DPOTrainer(gpt2(a, "GPT2LMHeadModel"), args=args, train_dataset=data,
                         processing_class=tokenizer(a.vocab, 0), callbacks=[timer])
    shape = next(iter(trainer.get_train_dataloader()))["input_ids"].shape
    assert tuple(shape) == (2 * a.batch, a.prompt + a.new), shape
    trainer.train()
    seconds = (timer.ends[-1] - timer.ends[0]) / (len(timer.ends) - 1)
    return f"{a.batch / seconds:.1f} pairs/s"


def ppo(a, out):
    """Iterations of R rollouts, prompt P -> N new tokens sampled at temperature 1 with no stop
    token, 4 epochs x 4 minibatches of R / 4; seconds per iteration after the first."""
    use_trl(TRL["ppo"])
    import torch
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    g = torch.Generator().manual_seed(0)
    n = a.rollouts * (a.iterations + 1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, a.vocab, (n, a.prompt), generator=g).tolist()})
    # per_device_train_batch_size is the micro-batch of the update and also sets the rollouts per
    # iteration (times gradient_accumulation_steps); R with num_mini_batches=4 gives micro-batches of
    # R / 4 with one optimizer step each, as in this project
    args = PPOConfig(output_dir=out, per_device_train_batch_size=a.rollouts, gradient_accumulation_steps=1,
                     num_mini_batches=4, num_ppo_epochs=4, local_rollout_forward_batch_size=a.rollouts,
                     total_episodes=n, response_length=a.new, temperature=1.0, stop_token=None,
                     missing_eos_penalty=None, num_sample_generations=0, learning_rate=1e-4, **common(a))
    timer = clock(a.device)
    trainer = PPOTrainer(args=args, processing_class=tokenizer(a.vocab, a.vocab), model=gpt2(a, "GPT2LMHeadModel"),
                         ref_model=gpt2(a, "GPT2LMHeadModel"), reward_model=gpt2(a, "GPT2ForSequenceClassification"),
                         value_model=gpt2(a, "GPT2ForSequenceClassification"), train_dataset=data,
                         eval_dataset=data, callbacks=[timer])
    trainer.train()
    assert len(timer.ends) == a.iterations + 1, timer.ends
    return f"{(timer.ends[-1] - timer.ends[0]) / a.iterations:.2f} s"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", nargs="?", choices=list(TRL))
    p.add_argument("--install", action="store_true", help="install the anchors under .anchors/ (re-runnable)")
    p.add_argument("--wheels", help="with --install: offline, from this folder of wheels")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--positions", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=32, help="pairs per DPO step")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--rollouts", type=int, default=64, help="PPO rollouts per iteration")
    p.add_argument("--steps", type=int, default=5, help="DPO steps timed after a warm-up step")
    p.add_argument("--iterations", type=int, default=2, help="PPO iterations timed after a warm-up iteration")
    a = p.parse_args()
    if a.install:
        install(a.wheels)
    if a.figure is None:
        return
    if not installed():
        sys.exit(f"the anchors are not installed: python3 {sys.argv[0]} --install")
    with tempfile.TemporaryDirectory() as out:
        os.environ["HF_DATASETS_CACHE"] = out
        figure = {"dpo": dpo, "ppo": ppo}[a.figure](a, out)
    print(f"TRL {TRL[a.figure]} {figure}")


if __name__ == "__main__":
    main()
