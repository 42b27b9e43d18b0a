"""No host reads in the steady state of a step: SFT, the reward model and DPO read their figures and
their finiteness guard every few steps, packing's layout comes from the host, and a PPO minibatch
reads nothing back. Counted on the CPU by the aten operations that would make the host wait on a
GPU (tests/host_reads.py); docs/precision-and-parallel.md has the counts before and after."""
import pytest
import torch

import data
import dpo
import ppo
import reward
import sft
import training
from dpo import DPOConfig
from host_reads import HostReads, host
from model import GPT, GPTConfig, ScalarModel
from ppo import PPOConfig
from reward import RMConfig
from sft import SFTConfig
from plumbing.tokenizer import Tokenizer

LIMIT = 2  # host reads per step (SFT, RM, DPO) and per PPO minibatch
TEXTS = ["\n\nHuman: What colour is the sky?\n\nAssistant: Blue, thanks for asking.",
         "\n\nHuman: How many legs has an ant?\n\nAssistant: Six legs.",
         "\n\nHuman: Say hello.\n\nAssistant: Hello there, friend!"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS * 20, 300)


def records(n=24):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt, answer = TEXTS[i % 3].split("\n\nAssistant:")
        words = answer.split()
        cut = int(torch.randint(1, len(words) + 1, (), generator=g))
        out.append({"prompt": prompt + "\n\nAssistant:", "chosen": answer, "rejected": " " + " ".join(words[:cut][::-1]) + "?" * i})
    return out


def config(tokenizer):
    return GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)


def on_host(monkeypatch, module, name):
    """module.name, run uncounted (host), where the module has it."""
    if hasattr(module, name):
        monkeypatch.setattr(module, name, host(getattr(module, name)))


def counting_fit(monkeypatch, module, reads):
    """module.fit run under the counter, a mark at each step's loss; collate, units and
    data.to_device's planning (a batch built from lists, its masks read where they were made) run
    on the host by construction, uncounted."""
    real = training.fit
    on_host(monkeypatch, data, "to_device")

    def fit(model, examples, collate, step_loss, cfg, steps, *args, units=training.rows_of, **kwargs):
        def marked(forward, batch):
            reads.mark()
            return step_loss(forward, batch)
        with reads:
            return real(model, examples, host(collate), marked, cfg, steps, *args, units=host(units), **kwargs)
    monkeypatch.setattr(module, "fit", fit)


def per_step(reads):
    return [len(ops) for ops in reads.per_interval()]


def assert_six_steps_within_the_limit(reads, stage):
    counts = per_step(reads)
    print(f"{stage} reads per step", counts, reads.per_interval()[0])
    assert len(counts) == 6 and max(counts) <= LIMIT, reads.per_interval()


def test_an_sft_step_reads_the_host_at_most_twice(tokenizer, tmp_path, monkeypatch):
    reads = HostReads()
    counting_fit(monkeypatch, sft, reads)
    torch.manual_seed(0)
    cfg = SFTConfig(steps=6, batch_size=4, save_every=0)
    demos = [(r["prompt"], r["chosen"]) for r in records()]
    sft.train_sft(GPT(config(tokenizer)), tokenizer, demos, cfg, str(tmp_path / "sft"), 16, "cpu", "fp32", 0)
    assert_six_steps_within_the_limit(reads, "sft")


def test_a_reward_model_step_reads_the_host_at_most_twice(tokenizer, tmp_path, monkeypatch):
    reads = HostReads()
    counting_fit(monkeypatch, reward, reads)
    torch.manual_seed(0)
    cfg = RMConfig(epochs=1, batch_size=4, save_every=0)
    demos = [(r["prompt"], r["chosen"]) for r in records()]
    reward.train_reward_model(ScalarModel(config(tokenizer)), tokenizer, records(), records(6), demos, cfg,
                              str(tmp_path / "rm"), 16)
    assert_six_steps_within_the_limit(reads, "rm")


def test_a_dpo_step_reads_the_host_at_most_twice(tokenizer, tmp_path, monkeypatch):
    reads = HostReads()
    counting_fit(monkeypatch, dpo, reads)
    torch.manual_seed(0)
    policy = GPT(config(tokenizer))
    reference = GPT(config(tokenizer)).eval().requires_grad_(False)
    cfg = DPOConfig(epochs=1, batch_size=4, save_every=0)
    dpo.train_dpo(policy, reference, tokenizer, records(), records(6), cfg, str(tmp_path / "dpo"), 16)
    assert_six_steps_within_the_limit(reads, "dpo")


def test_a_ppo_minibatch_reads_the_host_at_most_twice(tokenizer, tmp_path, monkeypatch):
    """Marks at each minibatch's policy loss; the iteration's own figures are read once, after the
    last minibatch (counted with it)."""
    reads = HostReads()
    real = ppo.minibatch_policy_loss

    def marked(*args, **kwargs):
        reads.mark()
        return real(*args, **kwargs)
    monkeypatch.setattr(ppo, "minibatch_policy_loss", marked)
    on_host(monkeypatch, ppo, "rollout")  # sampling: not a minibatch's work
    on_host(monkeypatch, ppo, "host_plan")  # on the host by construction
    torch.manual_seed(0)
    c = config(tokenizer)
    policy = GPT(c)
    cfg = PPOConfig(iterations=2, rollouts=8, epochs=2, minibatches=2, sample_every=0, save_every=0)
    prompts = [r["prompt"] for r in records(3)]
    with reads:
        ppo.train_ppo(policy, GPT(c).eval(), ScalarModel(c).eval(), ScalarModel(c), tokenizer, prompts, cfg,
                      str(tmp_path / "ppo"), max_new_tokens=8)
    counts = per_step(reads)
    print("ppo reads per minibatch", counts, reads.per_interval()[3])
    assert len(counts) == 8 and max(counts) <= LIMIT, reads.per_interval()
