"""--reward-model (hf_reward.py): a Hugging Face sequence classifier scores as transformers scores it,
re-tokenises the policy's text where its tokenizer differs, stops a bad folder with one line before
any work, and replaces the rm stage of a whole run."""
import os

import pytest
import torch

from hf_reward import ReadAsTransformers, load_sequence_classifier, pad_token_id, reward_model_at
from task import make_task
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, PAD = 120, 5

# layout: (transformers config class, its settings)
LAYOUTS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64)),
}


def hf_classifier(layout, vocab_size=V, pad=PAD, seed=0, eos=0, **changes):
    """A random transformers sequence classifier of one label: every weight and norm gain random.
    eos: config.json's eos_token_id (0: the <|endoftext|> of this project's tokenizers)."""
    cls, settings = LAYOUTS[layout]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(vocab_size=vocab_size, num_labels=1, pad_token_id=pad, bos_token_id=None,
                                        eos_token_id=eos, **{**settings, **changes})
    hf = transformers.AutoModelForSequenceClassification.from_config(config).float().eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p)) if key.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")) \
                else p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return hf


def save_classifier(hf, folder, tokenizer):
    hf.save_pretrained(folder)
    tokenizer.tok.save(str(folder / "tokenizer.json"))
    return folder


def task_tokenizer(vocab_size, seed=0):
    texts = [p + r for p, r in make_task(seed, n_sft=300, n_pref=0)["sft"]]
    return Tokenizer.train(texts, vocab_size)


def padded(rows, left):
    """Rows of ids -> (ids, mask), padded with PAD on the left or the right."""
    T = max(map(len, rows))
    ids, mask = torch.full((len(rows), T), PAD), torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, at], mask[i, at] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("pad", [PAD, None], ids=["pad", "no-pad"])
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_scores_equal_transformers(tmp_path, layout, pad, left):
    """Each row's score equals transformers' on that row alone, and on the padded batch where
    transformers takes one (a pad_token_id; left padding with positions from the mask, as TRL does).
    A row that ends in the pad token is read before it, as transformers reads it."""
    hf = hf_classifier(layout, pad=pad)
    hf.save_pretrained(tmp_path)
    ours = ReadAsTransformers(load_sequence_classifier(tmp_path).eval(), pad_token_id(tmp_path), None)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(PAD + 1, V, (n,), generator=g).tolist() for n in (14, 9, 3, 11)]
    rows[1] += [PAD, PAD]  # a response that ends in the pad token (GPT-2 reward models pad with eos)
    ids, mask = padded(rows, left)
    scores = ours(ids, mask)
    assert scores.shape == ids.shape and torch.equal(scores, scores[:, :1].expand_as(scores))
    alone = torch.cat([hf(torch.tensor([r])).logits[:, 0] for r in rows])
    assert (scores[:, 0] - alone).abs().max() < 1e-5
    assert alone.std() > 0.1  # scores far apart: the comparison sees a wrong position
    if pad is not None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = hf(ids, attention_mask=mask, position_ids=position_ids).logits[:, 0]
        assert (scores[:, 0] - batch).abs().max() < 1e-5


@torch.no_grad()
def test_another_tokenizer_scores_the_text(tmp_path):
    """With a tokenizer other than the policy's, the reward model scores each row's text encoded
    with its own, plus its own end-of-sequence token where the policy's response ended."""
    policy_tok, own = task_tokenizer(300), task_tokenizer(400)
    hf = hf_classifier("qwen2", vocab_size=own.vocab_size, pad=own.pad_id)
    rm = reward_model_at(save_classifier(hf, tmp_path, own), policy_tok)
    assert isinstance(rm, ReadAsTransformers) and rm.own is not None
    prompt, responses = "\n\nHuman: What is the capital of France?\n\nAssistant:", [" Paris.", " I do not know it"]
    rows = [policy_tok.encode(prompt) + policy_tok.encode(responses[0]) + [policy_tok.eos_id],  # ended
            policy_tok.encode(prompt) + policy_tok.encode(responses[1])]  # cut at the length limit
    ids, mask = padded(rows, left=True)
    expected = [hf(torch.tensor([own.encode(prompt + responses[0]) + [own.eos_id]])).logits[0, 0],
                hf(torch.tensor([own.encode(prompt + responses[1])])).logits[0, 0]]
    assert (rm(ids, mask)[:, -1] - torch.stack(expected)).abs().max() < 1e-5
    same = reward_model_at(save_classifier(hf, tmp_path / "same", policy_tok), policy_tok)
    assert same.own is None  # the policy's tokenizer: its ids as they are
