"""The stages around the method, in the order the pipeline runs them (mpo.pipeline): the
tokenizer, SFT (pi_sft), the reward model (r_phi), on real data the judge, and the evaluation;
Setup, what they share; and the models the method's own stages (mpo.py: the split, DPO and PPO)
read from a folder: the reward model's scores of the pairs, PPO's critic and reward model.
"""
import copy
import os
from functools import partial
from typing import NamedTuple

import torch
from tqdm import tqdm

import data
from plumbing import distributed
from plumbing.checkpoint import load_checkpoint, save_checkpoint
from plumbing.hf import load_gpt
from plumbing.files import write_json
from evaluate import against_mpo, chosen_values, evaluate_policy, mean_gold, summarize
from model import GPT, GPTConfig
from lora import AdaptersOff, adapters
from plumbing.hf_reward import as_reward_model, critic_start, reward_model_at
from reward import fact_accuracy, load_reward_model, score, train_reward_model
from sft import train_sft
from plumbing.tokenizer import Tokenizer
from training import DTYPES, Memory, Runtime


class Setup(NamedTuple):
    """What the stages of one pipeline share: the task (data.load_task), its tokenizer, the
    longest response, where the models run, the seed, how the evaluation samples, and how the
    stages hold their models (training.Memory: adapters, checkpointing, frozen models' dtype) and how
    the training loops use the machine (training.Runtime: compile, micro-batches, step states by time)."""
    task: dict
    tokenizer: Tokenizer
    max_new_tokens: int
    device: str
    dtype: str
    seed: int
    temperature: float
    samples: int
    memory: Memory = Memory()
    runtime: Runtime = Runtime()

    def mean_gold(self, model, show=0, prompts=None):
        return mean_gold(model, self.tokenizer, self.task, self.max_new_tokens, self.temperature, self.seed,
                         self.device, self.dtype, show, prompts)


def tokenizer_stage(folder, task, vocab_size, init=None):
    """--init's tokenizer as it is (a chat run's: ending a response with its template's end of turn,
    Tokenizer.for_chat), or a byte-level BPE trained on the training text only: the held-out
    prompts' wording stays unseen."""
    path = os.path.join(folder, "tokenizer.json")
    if init:  # with its end-of-sequence and padding tokens (Tokenizer.save keeps them beside it)
        tokenizer = Tokenizer.load(init.tokenizer)
        template = task.get("template")
        (tokenizer.for_chat(template) if template else Tokenizer(tokenizer.tok, tokenizer.eos_id, tokenizer.pad_id)).save(path)
        return {"from": init.tokenizer}
    texts = [p + r for p, r in task["sft"]] + [r["prompt"] + r["chosen"] for r in task["pref"]]
    Tokenizer.train(texts, vocab_size).save(path)
    return {}


def sft_stage(folder, s, cfg, shape, init=None):
    """pi_sft: a fresh GPT of `shape` (or --init's weights) trained on the demonstrations."""
    task, tokenizer, R = s.task, s.tokenizer, s.max_new_tokens
    model = (load_gpt(init.path, s.device, s.memory.held("sft")) if init else
             GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **shape)).to(s.device))
    before = s.mean_gold(model) if task["gold"] else None
    model = s.memory.trained(model, "sft")
    loss = train_sft(model, tokenizer, task["sft"], cfg, folder, R, s.device, s.dtype, s.seed, s.runtime)
    save_checkpoint(model, folder)  # --init's folder lies outside the run: its weights, adapters (if any) held
    if not task["gold"]:
        return {"final_loss": loss}
    after = s.mean_gold(model, show=4)
    floor = task["entropy_floor"]([p for p, _ in task["sft"]], lambda r: len(data.encode_response(tokenizer, r)[:R]))
    tqdm.write(f"sft: mean gold reward on {len(task['eval'])} held-out prompts {after:+.3f} "
               f"(untrained model {before:+.3f}); final loss {loss:.3f}, the task's floor {floor:.3f}")
    return {"final_loss": loss, "entropy_floor": floor, "gold_untrained": before, "gold_sft": after}


def rm_stage(folder, s, sft_dir, cfg):
    """r_phi: the SFT model with a scalar head, Bradley-Terry on every pair."""
    task = s.task
    model = s.memory.trained(load_checkpoint(sft_dir, "scalar", s.device, s.memory.held("rm"))[0], "rm")
    summary = train_reward_model(model, s.tokenizer, task["pref"], task["held_out"], task["sft"][:512], cfg,
                                 folder, s.max_new_tokens, s.device, s.dtype, s.seed, base=sft_dir, runtime=s.runtime)
    if task["answers"]:  # does it know the facts? (docs/results: a better reward model)
        summary |= fact_accuracy(model, s.tokenizer, task["eval"], task["answers"], s.max_new_tokens, s.device, s.dtype)
        tqdm.write(f"rm: the right answer scored above every wrong one on {summary['fact_accuracy']:.0%} "
                   f"of the factual evaluation questions (chance {summary['fact_chance']:.0%})")
    return summary


def judge_stage(folder, s, sft_dir, cfg):
    """Real data's judge, in the place of the built-in task's gold reward: a second reward model,
    trained as r_phi is (from SFT, Bradley-Terry, rm's settings) on the judge's pairs alone
    (data.load_task), which neither r_phi, the split, DPO, PPO nor SFT's default demonstrations
    see. Writes pairs.json, the line numbers of its pairs in --data."""
    task = s.task
    model = s.memory.trained(load_checkpoint(sft_dir, "scalar", s.device, s.memory.held("rm"))[0], "rm")
    summary = train_reward_model(model, s.tokenizer, task["judge"], task["held_out"], task["sft"][:512], cfg,
                                 folder, s.max_new_tokens, s.device, s.dtype, s.seed, base=sft_dir, runtime=s.runtime)
    write_json(os.path.join(folder, "pairs.json"), [r["line"] for r in task["judge"]])
    return {"pairs": len(task["judge"]), **summary}


def score_pairs(rm_dir, records, tokenizer, max_response, device="cpu", dtype="fp32", conversations=None):
    """The split's scores: the reward model in rm_dir (the rm stage's, or --reward-model's), frozen
    in the compute dtype, on the chosen and on the rejected side of every pair. conversations: the
    task's (data.load_task), for a reward model of another tokenizer."""
    reward_model = reward_model_at(rm_dir, tokenizer, device, DTYPES[dtype], conversations)
    mine = distributed.shard(records)  # data parallel: each rank scores its part of the pairs
    return tuple(torch.tensor(distributed.gather(score(
        reward_model, tokenizer, [r["prompt"] for r in mine], [r[side] for r in mine], max_response, device,
        dtype).tolist())) for side in ("chosen", "rejected"))


def critic_and_reward_model(rm_dir, sft_dir, tokenizer, block_size, device, memory, conversations=None):
    """PPO's critic, to train, and its frozen reward model; and whether the critic starts as the
    reward model (as in the paper's recipe: hf_reward.critic_start; else SFT with a fresh value
    head, where the reward model cannot read the policy's tokens). With adapters, a critic that
    starts as the reward model trains its own adapter and value head on the reward model's
    backbone, and the reward model is that backbone with the adapters off and its own head: one
    backbone for both. conversations: the task's, for a reward model of another tokenizer."""
    critic, is_reward_model = critic_start(rm_dir, sft_dir, tokenizer, block_size, device, memory.held("ppo"))
    critic = memory.trained(critic, "ppo")
    load = partial(reward_model_at, rm_dir, tokenizer, device, memory.held(), conversations)
    reward_model = (reward_model_of(critic, load, memory, partial(as_reward_model, rm_dir, tokenizer,
                                                                  conversations=conversations))
                    if is_reward_model else memory.frozen(load()))
    return critic, reward_model, is_reward_model


def reward_model_of(critic, load, memory, read=None):
    """Stage 2's frozen reward model, for a critic that starts as the reward model. With adapters it
    is the critic's backbone with the adapters off under the reward model's own head (the critic's,
    copied before training), read as the reward model is read (read: hf_reward.as_reward_model);
    else a second model, load()."""
    if adapters(critic):
        model = AdaptersOff(critic, copy.deepcopy(critic.head).requires_grad_(False))
        return read(model) if read else model
    return memory.frozen(load())


def eval_stage(folder, s, policies, rm_dir, no_eos_score, judge_dir=None):
    """Every policy ({method: folder}) judged on the evaluation prompts, SFT first; with judge_dir
    (real data) the judge's reward model scores them too, beside the training reward model."""
    frozen, held = s.memory.frozen, s.memory.held()
    sft = frozen(load_checkpoint(policies["sft"], "gpt", s.device, held)[0])
    # the rm stage's, or --reward-model's
    reward_model = frozen(reward_model_at(rm_dir, s.tokenizer, s.device, held, s.task.get("conversations")))
    judge = frozen(load_reward_model(judge_dir, s.device, held)) if judge_dir else None
    judged, mine = {}, distributed.shard(s.task["eval"])  # data parallel: each rank judges its part
    for method, policy_dir in policies.items():
        policy = frozen(load_checkpoint(policy_dir, "gpt", s.device, held)[0])
        part = evaluate_policy(policy, sft, reward_model, s.tokenizer, mine, s.max_new_tokens, s.temperature,
                               s.seed + distributed.rank(), s.task, no_eos_score, s.samples, s.device, s.dtype, judge)
        judged[method] = {key: distributed.gather(values) for key, values in part.items()}
    write_json(os.path.join(folder, "judged.json"), judged)  # per prompt: to recompute any figure
    write_json(os.path.join(folder, "samples.json"), [{"prompt": p, **{m: judged[m]["text"][i] for m in judged}}
                                                       for i, p in enumerate(s.task["eval"][:50])])
    chosen = chosen_values(s.task, reward_model if judge is None else judge, s.tokenizer, s.max_new_tokens,
                           no_eos_score if judge is None else None, s.device, s.dtype)
    return {"methods": {m: summarize(judged[m], judged["sft"], chosen) for m in judged}, "vs_mpo": against_mpo(judged)}
