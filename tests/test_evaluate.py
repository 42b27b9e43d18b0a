"""evaluate.py's reference for the win rate: the data's chosen responses are judged as a policy's
answers are, cut at the longest response and, cut without eos, penalised as PPO does."""
import torch

import data
from evaluate import chosen_values
from model import GPTConfig, ScalarModel
from reward import score_ids
from task import gold_reward, make_task
from plumbing.tokenizer import Tokenizer
from tolerance import network_atol

PROMPT, OTHER = make_task(0, n_sft=0, n_pref=0)["eval"][:2]
SHORT = " Happy to help! Blue."
LONG = " Happy to help! " + "This is a long and winding answer with many words in it. " * 4


def judged(gold, max_response=24):
    tok = Tokenizer.train([PROMPT + SHORT, PROMPT + LONG] * 10, 300)
    torch.manual_seed(0)
    reward_model = ScalarModel(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=16)).eval()
    task = {"eval": [PROMPT, OTHER], "gold": gold_reward if gold else None,
            "held_out": [{"prompt": PROMPT, "chosen": SHORT}, {"prompt": OTHER, "chosen": LONG}]}
    return tok, reward_model, chosen_values(task, reward_model, tok, max_response, no_eos_score=-7.0)


def test_a_chosen_response_cut_at_the_length_limit_gets_the_no_eos_score():
    tok, reward_model, values = judged(gold=False)
    assert len(data.encode_response(tok, SHORT)) <= 24 < len(data.encode_response(tok, LONG))
    short = score_ids(reward_model, [tok.encode(PROMPT)], [data.encode_response(tok, SHORT)], tok.pad_id)
    assert values[1] == (1, -7.0)
    # from magnitudes (tolerance.py): the one-layer reward model's float32 scores, batched otherwise
    assert values[0][0] == 0 and abs(values[0][1] - short.item()) < network_atol(short, 4 * 16, 1)


def test_the_gold_judge_reads_the_chosen_text_as_cut():
    tok, _, values = judged(gold=True)
    cut = tok.decode(data.encode_response(tok, LONG)[:24])
    assert values == [(0, gold_reward(PROMPT, SHORT)), (1, gold_reward(OTHER, cut))]
    assert gold_reward(OTHER, cut) != gold_reward(OTHER, LONG)
