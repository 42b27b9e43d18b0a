"""--reward-model (plumbing/hf_reward.py): a Hugging Face sequence classifier scores as transformers scores it,
re-tokenises the policy's text where its tokenizer differs, stops a bad folder with one line before
any work, and replaces the rm stage of a whole run."""
import json
import os

import pytest
import torch

from cli import run_train
from plumbing.hf_reward import ReadAsTransformers, check_reward_model, load_sequence_classifier, pad_token_id, reward_model_at
from task import make_task
from plumbing.tokenizer import Tokenizer
from tolerance import network_atol

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_FILE = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
V, PAD = 120, 5
WIDEST = 4 * 32  # the longest sum of the layouts' layers: GPT-2's MLP, 4 n_embd

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
    atol = network_atol(alone, WIDEST, 2)  # from magnitudes (tolerance.py): transformers sums in its own order
    assert (scores[:, 0] - alone).abs().max() < atol
    assert alone.std() > 0.1  # scores far apart: the comparison sees a wrong position
    if pad is not None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = hf(ids, attention_mask=mask, position_ids=position_ids).logits[:, 0]
        assert (scores[:, 0] - batch).abs().max() < atol


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
    expected = torch.stack(expected)
    assert (rm(ids, mask)[:, -1] - expected).abs().max() < network_atol(expected, WIDEST, 2)  # from magnitudes
    same = reward_model_at(save_classifier(hf, tmp_path / "same", policy_tok), policy_tok)
    assert same.own is None  # the policy's tokenizer: its ids as they are


# ----------------------------------------------------------------------------- a bad folder

def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def not_a_classifier(folder, tokenizer):
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V)).save_pretrained(folder)
    tokenizer.tok.save(str(folder / "tokenizer.json"))


def classifier(changes=None, labels=1, tokenizer_file=True):
    def make(folder, tokenizer):
        hf = hf_classifier("gpt2", vocab_size=tokenizer.vocab_size, n_layer=1)
        hf.save_pretrained(folder)
        if tokenizer_file:
            tokenizer.tok.save(str(folder / "tokenizer.json"))
        if labels != 1:
            edit_config(folder, id2label={str(i): f"LABEL_{i}" for i in range(labels)})
        if changes:
            edit_config(folder, **changes)
    return make


BAD_FOLDERS = {  # name: (how the folder is made, what the one line says)
    "causal-lm": (not_a_classifier, "field 'architectures' is ['GPT2LMHeadModel'], not a sequence classifier"),
    "two-labels": (classifier(labels=2), "2 labels (field 'id2label'); a reward model has one"),
    "no-tokenizer": (classifier(tokenizer_file=False), "no tokenizer.json beside the weights"),
    "shapes": (classifier({"n_embd": 48}), "has shape"),
    "vocabulary": (classifier({"vocab_size": 100}), "has shape"),
    "pad-token-id": (classifier({"pad_token_id": "<pad>"}), "field 'pad_token_id' must be a token id"),
    "llama-model-type": (classifier({"architectures": ["LlamaForSequenceClassification"]}),
                         "field 'model_type' is 'gpt2', but LlamaForSequenceClassification is 'llama'"),
}


@pytest.mark.parametrize("name", BAD_FOLDERS)
def test_a_bad_reward_model_folder_stops_before_any_work(tmp_path, capsys, name):
    import train
    make, message = BAD_FOLDERS[name]
    (tmp_path / "rm").mkdir()
    make(tmp_path / "rm", task_tokenizer(300))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "micro", "--out", str(tmp_path / "run"), "--reward-model", str(tmp_path / "rm")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and str(tmp_path / "rm") in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_project_checkpoint_is_not_a_sequence_classifier(tmp_path):
    from plumbing.checkpoint import save_checkpoint
    from plumbing.files import UserError
    from model import GPT, GPTConfig, ScalarModel
    save_checkpoint(ScalarModel(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=8), GPT), tmp_path)
    with pytest.raises(UserError, match="a checkpoint of this project, not a Hugging Face sequence classifier"):
        check_reward_model(str(tmp_path))


def test_the_content_hash_covers_weights_and_configs(tmp_path):
    tokenizer = task_tokenizer(300)
    classifier()(tmp_path, tokenizer)
    first = check_reward_model(str(tmp_path)).sha256
    edit_config(tmp_path, pad_token_id=None)
    second = check_reward_model(str(tmp_path)).sha256
    hf_classifier("gpt2", vocab_size=tokenizer.vocab_size, n_layer=1, seed=1).save_pretrained(tmp_path)
    assert len({first, second, check_reward_model(str(tmp_path)).sha256}) == 3


# ----------------------------------------------------------------------------- whole runs

FAST = ["--preset", "micro", "--n-sft", "200", "--n-pref", "120", "--sft-steps", "20", "--ppo-iterations", "2",
        "--eval-prompts", "8", "--eval-samples", "1", "--easy-fraction", "0.5"]


def test_micro_run_with_the_policys_tokenizer(tmp_path):
    """A GPT-2 classifier with the run's own tokenizer: no rm stage, the split's gaps are transformers'
    scores of the pairs, PPO's critic starts from the reward model, and a changed reward model
    reruns the split and PPO, not SFT."""
    out, folder = tmp_path / "run", tmp_path / "rm"
    import train
    train.main([*FAST, "--out", str(out), "--stages", "tokenizer"])
    tokenizer = Tokenizer.load(out / "tokenizer" / "tokenizer.json")
    hf = hf_classifier("gpt2", vocab_size=tokenizer.vocab_size, pad=tokenizer.pad_id, n_positions=96)
    save_classifier(hf, folder, tokenizer)
    proc = run_train(*FAST, "--out", str(out), "--reward-model", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "rm").exists()
    assert "the rm stage was skipped" in (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["reward_model"]["folder"] == str(folder) and "mpo" in results["methods"]
    assert json.loads((out / "ppo" / "done.json").read_text())["summary"]["critic_from"] == "rm"
    pairs = make_task(0, n_sft=200, n_pref=120)["pref"]  # the run's task
    gaps = json.loads((out / "split" / "gaps.json").read_text())
    with torch.no_grad():
        for i in (0, 1, 2):  # responses cut at --max-new-tokens 32, as every reward model reads them
            r = [hf(torch.tensor([tokenizer.encode(pairs[i]["prompt"]) + (tokenizer.encode(pairs[i][side])
                                  + [tokenizer.eos_id])[:32]])).logits[0, 0] for side in ("chosen", "rejected")]
            # from magnitudes (tolerance.py): a gap is two scores', each within network_atol
            assert abs(gaps[i] - (r[0] - r[1]).item()) < 2 * network_atol(torch.stack(r), WIDEST, 2)
    save_classifier(hf_classifier("gpt2", vocab_size=tokenizer.vocab_size, pad=tokenizer.pad_id, n_positions=96,
                                  seed=1), folder, tokenizer)
    proc = run_train(*FAST, "--out", str(out), "--reward-model", str(folder), "--stages", "tokenizer,sft,rm,split,dpo,ppo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== sft" not in proc.stdout and "== split" in proc.stdout and "== ppo" in proc.stdout


def test_micro_run_with_another_tokenizer(tmp_path, monkeypatch):
    """A Qwen2 classifier whose tokenizer is not the run's, with a chat template of its own: every
    row the split, PPO and the evaluation score is the built-in task's dialogue rendered anew in that
    template (tests/test_chat.py checks the rendering against transformers), and PPO's critic starts
    from SFT with a fresh value head."""
    from plumbing import chat
    own = task_tokenizer(400, seed=3)
    folder = save_classifier(hf_classifier("qwen2", vocab_size=own.vocab_size, pad=own.pad_id), tmp_path / "rm", own)
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    found, conversation_of = [], chat.conversation_of
    monkeypatch.setattr(chat, "conversation_of", lambda *a: found.append(conversation_of(*a)) or found[-1])
    out = tmp_path / "run"
    proc = run_train(*FAST, "--out", str(out), "--reward-model", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "conversations rendered anew with its chat template" in proc.stdout
    assert len(found) > 2 * 120 and all(found)  # the split's 120 pairs, then PPO's rollouts and the evaluation
    assert "the rm stage is skipped" in proc.stdout and not (out / "rm").exists()
    assert json.loads((out / "ppo" / "done.json").read_text())["summary"]["critic_from"] == "sft"
    assert "the rm stage was skipped" in (out / "results.md").read_text()


@pytest.mark.skipif(not os.path.exists(HH_FILE), reason="the HH-RLHF file beside the project is absent")
def test_hh_rlhf_tiny_run_with_a_reward_model(tmp_path):
    """Real data at the tiny preset (its first 400 dialogues, a few steps of each stage) with a GPT-2
    classifier of another tokenizer: the run completes and reports the reward model it used."""
    import gzip
    with gzip.open(HH_FILE, "rt") as f:
        (tmp_path / "hh.jsonl").write_text("".join(line for line, _ in zip(f, range(400))))
    own = task_tokenizer(400)
    folder = save_classifier(hf_classifier("gpt2", vocab_size=own.vocab_size, pad=None, n_positions=256),
                             tmp_path / "rm", own)
    out = tmp_path / "run"
    proc = run_train("--preset", "tiny", "--data", str(tmp_path / "hh.jsonl"), "--easy-fraction", "0.5", "--reward-model", str(folder),
                   "--out", str(out), "--sft-steps", "5", "--rm-epochs", "1", "--dpo-epochs", "1",
                   "--ppo-iterations", "2", "--ppo-rollouts", "16", "--max-new-tokens", "16", "--eval-prompts", "8",
                   "--eval-samples", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "rm").exists() and (out / "judge" / "done.json").exists()
    assert f"reward model: {folder}" in (out / "results.md").read_text()
