"""The Llama layout (llama.py) against transformers: Llama and Qwen2 folders give the same logits,
left padding too, the same greedy tokens through the KV cache, export loads back, bad folders are
one-line errors; and the micro pipeline runs from a tiny Qwen2 folder with its own tokenizer."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli import run_train
from plumbing.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from plumbing.hf import load_gpt, load_hf_llama, save_hf_llama
from plumbing.files import DataError
from plumbing.tokenizer import Tokenizer
from llama import Llama, LlamaConfig
from model import ScalarModel
from sampling import KVCache, generate
from task import make_task
from tolerance import assert_exact, network_atol

transformers = pytest.importorskip("transformers")
from test_hf_gpt2 import hf_logits  # noqa: E402  transformers' logits with left padding, as for GPT-2
V = 120

# name: (transformers config class, its settings, max_shard_size for save_pretrained or None)
CASES = {
    "llama-gqa-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True), None),
    "llama-mqa-untied-bias-llama3": ("LlamaConfig", dict(
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False, attention_bias=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}), None),
    "qwen2-gqa-untied-sharded": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                    rope_theta=1000000.0), "20KB"),
    "qwen2-mha-tied-linear": ("Qwen2Config", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                 rope_scaling={"rope_type": "linear", "factor": 4.0}), None),
}
SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-5)


def hf_model(name, seed=0):
    """A random transformers model of the case: every weight, bias and norm gain random."""
    cls, settings, _ = CASES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**SHAPE, **settings)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if key.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return hf


def hf_folder(name, path, seed=0):
    hf = hf_model(name, seed)
    shard = CASES[name][2]
    hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return hf


def left_padded(B=3, T=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :T // 3] = 0
    mask[2, :2 * T // 3] = 0
    return idx, mask


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_logits_match_transformers(tmp_path, name):
    hf = hf_folder(name, tmp_path)
    if CASES[name][2]:
        assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    ours = load_gpt(str(tmp_path)).eval()
    assert isinstance(ours, Llama) and ours.config.model_type == CASES[name][0][:-6].lower()
    idx = torch.randint(0, V, (2, 40))
    theirs = hf_logits(hf, idx)
    assert theirs.abs().max() > 1  # logits of a useful size, not a random init's near-zero ones
    atol = network_atol(theirs, 48, 2)  # from magnitudes (tolerance.py): transformers casts to float32 inside
    assert (ours(idx) - theirs).abs().max() < atol
    idx, mask = left_padded()
    real = mask.bool()
    assert (ours(idx, mask)[real] - hf_logits(hf, idx, mask)[real]).abs().max() < atol


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_greedy_generation_with_the_kv_cache_gives_transformers_tokens(tmp_path, name):
    hf = hf_folder(name, tmp_path)
    ours = load_gpt(str(tmp_path)).eval()
    assert KVCache(ours.config, 1, 4, "cpu", torch.float32).k.shape[2] == ours.config.n_kv_head
    idx, mask = left_padded(T=8)
    tokens, _ = generate(ours, idx, mask, max_new_tokens=12, temperature=0)
    hf.generation_config.eos_token_id = None
    out = hf.generate(idx, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(tokens, out[:, idx.size(1):])


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_our_export_loads_in_transformers_with_the_same_logits(tmp_path, name):
    hf_folder(name, tmp_path / "in", seed=3)
    ours = load_gpt(str(tmp_path / "in")).eval()
    save_hf_llama(ours, tmp_path / "out", eos_id=5, pad_id=6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[ours.config.model_type]
    assert hf.config.eos_token_id == 5 and hf.config.tie_word_embeddings == ours.config.tie_word_embeddings
    idx, mask = left_padded()
    real = mask.bool()
    atol = network_atol(ours(idx), 48, 2)  # from magnitudes (tolerance.py)
    assert (ours(idx) - hf_logits(hf, idx)).abs().max() < atol
    assert (ours(idx, mask)[real] - hf_logits(hf, idx, mask)[real]).abs().max() < atol
    again = load_hf_llama(tmp_path / "out").eval()
    assert torch.equal(again(idx), ours(idx))
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


@torch.no_grad()
def test_a_fresh_llama_saved_loads_in_transformers(tmp_path):
    """Built here (not imported): the checkpoint of this project and the export both keep it."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                         intermediate_size=48, tie_word_embeddings=False, qkv_bias=True, model_type="qwen2")
    ours = Llama(config).eval()
    save_checkpoint(ours, tmp_path / "ckpt")
    loaded, info = load_checkpoint(tmp_path / "ckpt")
    assert info["arch"] == "llama" and loaded.config == config
    idx = torch.randint(0, V, (2, 20))
    assert torch.equal(loaded.eval()(idx), ours(idx))
    scalar, _ = load_checkpoint(tmp_path / "ckpt", kind="scalar")  # the reward model starts from the policy
    assert isinstance(scalar, ScalarModel) and isinstance(scalar.gpt, Llama)
    assert torch.equal(scalar.gpt.eval()(idx), ours(idx))
    save_checkpoint(scalar, tmp_path / "rm")
    critic, _ = load_checkpoint(tmp_path / "rm", kind="scalar")
    assert torch.equal(critic.eval()(idx), scalar.eval()(idx))
    save_hf_llama(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf(idx).logits - ours(idx)).abs().max() < network_atol(ours(idx), 48, 2)  # from magnitudes (tolerance.py)


def test_an_untied_vocabulary_projection_is_frozen_in_a_scalar_model():
    """The reward model and the critic never use it: no optimizer state, and DDP expects no gradient."""
    config = LlamaConfig(vocab_size=V, block_size=64, n_layer=1, n_head=2, n_embd=16, n_kv_head=1,
                         intermediate_size=32, tie_word_embeddings=False)
    critic = ScalarModel(config, Llama)
    critic(torch.randint(0, V, (2, 5))).sum().backward()
    trained = {id(p) for g in critic.configure_optimizers(1e-3).param_groups for p in g["params"]}
    assert all(p.grad is not None for n, p in critic.named_parameters() if id(p) in trained)
    assert id(critic.gpt.unembed.weight) not in trained and critic.gpt.unembed.weight.grad is None


@torch.no_grad()
def test_bf16_autocast_keeps_float32_logits_close(tmp_path):
    hf_folder("qwen2-gqa-untied-sharded", tmp_path)
    model = load_gpt(str(tmp_path)).eval()
    idx, mask = left_padded()
    exact = model(idx, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(idx, mask)
        tokens, _ = generate(model, idx, mask, max_new_tokens=6, temperature=0)
    assert mixed.dtype == torch.float32 and tokens.shape == (3, 6)
    real = mask.bool()
    assert (mixed - exact)[real].abs().max() < 0.05 * exact[real].abs().max()


def test_weight_decay_spares_embeddings_norms_and_biases():
    config = LlamaConfig(vocab_size=V, block_size=64, n_layer=1, n_head=2, n_embd=16, n_kv_head=1,
                         intermediate_size=32, tie_word_embeddings=False, qkv_bias=True)
    model = Llama(config)
    opt = model.configure_optimizers(1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {"unembed.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= decay
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"} <= no_decay


def test_a_gpt_checkpoint_without_arch_still_loads(tmp_path):
    from model import GPT, GPTConfig
    save_checkpoint(GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16)), tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    assert info.pop("arch") == "gpt"
    (tmp_path / "config.json").write_text(json.dumps(info))
    assert isinstance(load_gpt(str(tmp_path)), GPT)


# ----------------------------------------------------------------------------- bad folders: one line each

def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder, fn):
    state = load_file(folder / "model.safetensors")
    fn(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


BAD = [
    ("missing key", lambda f: edit_weights(f, lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
     r"model.safetensors: missing key 'model.layers.1.mlp.up_proj.weight'"),
    ("wrong shape", lambda f: edit_weights(f, lambda s: s.update({"model.norm.weight": torch.ones(7)})),
     r"model.safetensors: 'model.norm.weight' has shape \(7,\), config.json needs \(32,\)"),
    ("unexpected key", lambda f: edit_weights(f, lambda s: s.update({"model.layers.0.self_attn.o_proj.bias":
                                                                    torch.ones(32)})),
     r"model.safetensors: unexpected key 'model.layers.0.self_attn.o_proj.bias'"),
    ("untied head", lambda f: edit_config(f, tie_word_embeddings=False),
     r"model.safetensors: missing key 'lm_head.weight'"),
    ("rope type", lambda f: edit_config(f, rope_parameters=None, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"config.json: rope_scaling type 'yarn' is not supported \(default, linear, llama3\)"),
    ("rope field", lambda f: edit_config(f, rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     r"config.json: rope_scaling of type llama3 needs a positive number 'low_freq_factor'"),
    ("missing field", lambda f: edit_config(f, hidden_size=None), r"config.json: missing field 'hidden_size'"),
    ("heads", lambda f: edit_config(f, num_key_value_heads=3),
     r"config.json: n_head 4 is not a multiple of n_kv_head 3"),
    ("activation", lambda f: edit_config(f, hidden_act="gelu"), r"config.json: field 'hidden_act' is 'gelu'"),
    ("model type", lambda f: edit_config(f, model_type="mistral"),
     r"config.json: model_type 'mistral' is not supported"),
]


@pytest.mark.parametrize("case, breaks, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_folder_is_a_one_line_error(tmp_path, case, breaks, message):
    hf_folder("llama-gqa-tied", tmp_path)
    breaks(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_gpt(str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_a_missing_shard_is_a_one_line_error(tmp_path):
    hf_folder("qwen2-gqa-untied-sharded", tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"{shard}: no such file"):
        load_gpt(str(tmp_path))


def test_a_bad_init_folder_stops_train_py_with_one_line(tmp_path, capsys):
    import train
    hf_folder("llama-gqa-tied", tmp_path / "init")
    edit_config(tmp_path / "init", rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0})
    capsys.readouterr()  # transformers' progress bar
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "micro", "--init", str(tmp_path / "init"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "rope_scaling type 'dynamic'" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- tokenizers of Hugging Face folders

def small_tokenizer(extra=("<|im_end|>",)):
    texts = [p + r for p, r in make_task(0, n_sft=300, n_pref=0)["sft"]]
    tokenizer = Tokenizer.train(texts, 400)
    tokenizer.tok.add_special_tokens(list(extra))
    return Tokenizer(tokenizer.tok)


def test_end_of_sequence_and_padding_come_from_the_folder(tmp_path):
    tokenizer = small_tokenizer(("<|im_end|>", "<|fim_pad|>"))
    tokenizer.save(tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer_config.json").exists()  # this project's own tokens: no config written
    ids = {t: tokenizer.tok.token_to_id(t) for t in ("<|endoftext|>", "<|pad|>", "<|im_end|>", "<|fim_pad|>")}
    assert (Tokenizer.load(tmp_path / "tokenizer.json").eos_id, Tokenizer.load(tmp_path / "tokenizer.json").pad_id) == (
        ids["<|endoftext|>"], ids["<|pad|>"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "eos_token_id": ids["<|endoftext|>"]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|im_end|>"], 0]}))
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.eos_id, loaded.pad_id) == (ids["<|im_end|>"], ids["<|pad|>"])  # generation_config first
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|fim_pad|>"}))
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.eos_id, loaded.pad_id) == (ids["<|endoftext|>"], ids["<|fim_pad|>"])
    # saved elsewhere, the tokenizer keeps them: a tokenizer_config.json beside it names them
    Tokenizer(loaded.tok, ids["<|im_end|>"], ids["<|fim_pad|>"]).save(tmp_path / "copy.json")
    (tmp_path / "elsewhere").mkdir()
    os.replace(tmp_path / "copy.json", tmp_path / "elsewhere" / "tokenizer.json")
    os.replace(tmp_path / "tokenizer_config.json", tmp_path / "elsewhere" / "tokenizer_config.json")
    again = Tokenizer.load(tmp_path / "elsewhere" / "tokenizer.json")
    assert (again.eos_id, again.pad_id) == (ids["<|im_end|>"], ids["<|fim_pad|>"])


def test_a_tokenizer_without_end_of_sequence_is_a_one_line_error(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models
    tok = HFTokenizer(models.BPE())
    tok.add_special_tokens(["<|end_of_text|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no tokenizer_config.json, generation_config.json or config.json") as info:
        Tokenizer.load(tmp_path / "tokenizer.json")
    assert "\n" not in str(info.value)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json: field 'eos_token' is '<\|eot_id\|>', not a token"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert Tokenizer.load(tmp_path / "tokenizer.json").eos_id == 0


# ----------------------------------------------------------------------------- the micro pipeline from a Qwen2 folder

def qwen2_folder(init, dtype=torch.float32):
    """A tiny random Qwen2 folder whose tokenizer.json was trained here and whose config.json names
    an end-of-sequence token other than this project's <|endoftext|>: its id. Stored in `dtype`."""
    tokenizer = small_tokenizer()
    eos = tokenizer.tok.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=tokenizer.vocab_size + 8, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=96, tie_word_embeddings=True, eos_token_id=eos,
                                      bos_token_id=None)
    transformers.Qwen2ForCausalLM(config).to(dtype).save_pretrained(init)
    tokenizer.tok.save(str(init / "tokenizer.json"))
    assert json.loads((init / "config.json").read_text())["eos_token_id"] == eos
    return eos


def test_the_run_keeps_the_end_of_sequence_token_of_the_folder(tmp_path):
    import train
    eos = qwen2_folder(tmp_path / "qwen2")
    train.main(["--preset", "micro", "--init", str(tmp_path / "qwen2"), "--out", str(tmp_path / "run"),
                "--stages", "tokenizer"])
    assert Tokenizer.load(tmp_path / "run" / "tokenizer" / "tokenizer.json").eos_id == eos


def test_micro_pipeline_from_a_tiny_qwen2_folder(tmp_path):
    init = tmp_path / "qwen2"
    eos = qwen2_folder(init)
    out = tmp_path / "run"
    proc = run_train("--preset", "micro", "--init", init, "--out", out, "--stages", "tokenizer,sft,rm,split,dpo,ppo,eval",
                     "--export-hf", "--sft-steps", "30", "--rm-epochs", "1", "--easy-fraction", "0.5", "--eval-prompts", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"end of sequence '<|im_end|>' ({eos})" in proc.stdout  # check_init found the folder's
    results = json.loads((out / "results.json").read_text())
    assert {"sft", "mpo_stage1", "mpo"} <= set(results["methods"])
    assert json.loads((out / "ppo" / "config.json").read_text())["arch"] == "llama"
    exported = json.loads((out / "hf" / "mpo" / "config.json").read_text())
    assert exported["model_type"] == "qwen2" and exported["num_key_value_heads"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf" / "mpo").eval()
    ours, _ = load_checkpoint(out / "ppo", kind="gpt")
    ids = torch.tensor([Tokenizer.load(out / "hf" / "mpo" / "tokenizer.json").encode("\n\nHuman: Hi?\n\nAssistant:")])
    with torch.no_grad():
        logits = ours.eval()(ids)
        assert (hf(ids).logits - logits).abs().max() < network_atol(logits, 96, 2)  # from magnitudes (tolerance.py)
    # the reward model as Qwen2ForSequenceClassification: our score less the head's bias, read at the last token
    tok = Tokenizer.load(out / "tokenizer" / "tokenizer.json")
    assert ("the padding token is the end-of-sequence one" in proc.stdout) == (tok.pad_id == tok.eos_id)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf" / "reward_model").eval()
    assert type(classifier).__name__ == "Qwen2ForSequenceClassification"
    rm, _ = load_checkpoint(out / "rm", kind="scalar")
    with torch.no_grad():
        expected = rm.eval()(ids, torch.ones_like(ids))[:, -1] - rm.head.bias
        assert (classifier(ids).logits[:, 0] - expected).abs().max() < network_atol(expected, 96, 2)  # from magnitudes


# --preset gpu24 at the smallest sizes: every stage a step or two, on a batch of 16
GPU24_TINY = ["--n-sft", "64", "--n-pref", "64", "--max-new-tokens", "8", "--sft-steps", "4", "--sft-batch-size", "8",
              "--rm-epochs", "1", "--rm-batch-size", "16", "--dpo-epochs", "1", "--dpo-batch-size", "16",
              "--ppo-iterations", "2", "--ppo-rollouts", "4", "--ppo-epochs", "1", "--ppo-minibatches", "1",
              "--eval-prompts", "4", "--eval-samples", "1", "--easy-fraction", "0.5"]


def test_the_gpu24_pipeline_starts_each_stage_from_the_one_before_as_trained(tmp_path, monkeypatch):
    """--preset gpu24 (adapters on SFT, the reward model, DPO and PPO; bf16; checkpointing) from a
    tiny bf16 Qwen2 folder, every stage boundary read on one batch under bf16 autocast, as the
    stages compute: DPO starts from, and is anchored to, SFT as trained; PPO the DPO policy as
    trained; the split, the critic and PPO read the reward model as trained; each evaluated row is
    its policy as trained. Each within a fifth of bf16's own deviation from float32 on the trained
    model: the code before issue 45, which merged each adapter into the bf16 base on loading, was
    off by 0.8-1.2 times it at every boundary. DPO's first loss is log 2, PPO's first KL 0. SFT keeps
    the bf16 base and its adapters, the later stages their float32 adapters alone; --export-hf
    writes bf16 (merged as PEFT merges a bf16 model), which transformers loads with our logits."""
    import copy
    import mpo
    import reward
    import stages
    init, out = tmp_path / "qwen2", tmp_path / "run"
    qwen2_folder(init, torch.bfloat16)
    vocab = json.loads((init / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0

    def outputs(model, dtype="bf16"):
        """Logits (or scores) on ids, as a stage computes them (bf16 autocast), or in float32."""
        model = copy.deepcopy(model).eval()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
            return (model.float() if dtype == "fp32" else model)(ids, mask).float()

    trained, seen = {}, {}  # {stage: (outputs, bf16's deviation from float32)} at its save; {what read: outputs}

    def keep(save):
        def saved(model, folder, *args, **kwargs):
            bf16 = outputs(model)
            trained[os.path.basename(folder)] = bf16, (bf16 - outputs(model, "fp32")).abs().max().item()
            return save(model, folder, *args, **kwargs)
        return saved

    def reads(module, name, *calls, returned=None):
        """module.name records the outputs of its arguments at its first calls, each call's named by
        one tuple of calls (None: not recorded), and of what it returns, named by returned."""
        fn, calls = getattr(module, name), iter(calls)

        def recorded(*args, **kwargs):
            seen.update({role: outputs(m) for role, m in zip(next(calls, ()), args) if role})
            result = fn(*args, **kwargs)
            if returned:
                seen.setdefault(returned, outputs(result))
            return result
        monkeypatch.setattr(module, name, recorded)

    for module in (stages, reward, mpo):
        monkeypatch.setattr(module, "save_checkpoint", keep(module.save_checkpoint))
    reads(mpo, "train_dpo", ("dpo start",))
    reads(mpo, "reference_logps", ("dpo reference",))
    reads(stages, "reward_model_at", returned="split reward model")  # the split's (first); PPO's is the critic's backbone
    reads(mpo, "train_ppo", ("ppo start", "ppo reference", "ppo reward model", "critic start"))
    # eval_stage judges SFT first, then each method in order
    reads(stages, "evaluate_policy", ("eval sft", None, "eval reward model"), ("eval mpo_stage1",), ("eval mpo",))
    proc = run_train("--preset", "gpu24", "--init", init, "--out", out, "--device", "cpu", *GPU24_TINY, "--export-hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for read_as, stage in {"dpo start": "sft", "dpo reference": "sft", "split reward model": "rm", "critic start": "rm",
                           "ppo reward model": "rm", "ppo start": "dpo", "ppo reference": "dpo", "eval sft": "sft",
                           "eval mpo_stage1": "dpo", "eval mpo": "ppo", "eval reward model": "rm"}.items():
        noise, off = trained[stage][1], (seen[read_as] - trained[stage][0]).abs().max().item()
        assert off <= 0.2 * noise, f"{read_as}: {off:.2g} off the {stage} stage's model as trained (bf16: {noise:.2g})"
    # the first step's policy is its reference: DPO's margin h 0 (loss log 2) and PPO's KL 0, to bf16's
    # noise in a log-prob (at most 2x the logits') over the R = 8 tokens of each response
    beta, R, logprob_noise = 0.1, 8, 2 * trained["sft"][1]
    first = lambda stage: json.loads((out / stage / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first("dpo")["loss"] - math.log(2)) <= beta / 2 * 2 * R * logprob_noise  # -log sigmoid(beta h)
    assert abs(first("ppo")["kl"]) <= R * logprob_noise
    # SFT (on --init's folder, outside the run) keeps the bf16 base and its float32 adapters, held;
    # the later stages their adapters alone
    sft = load_file(out / "sft" / "model.safetensors")
    assert sft["model.layers.0.mlp.up_proj.base.weight"].dtype == torch.bfloat16
    assert sft["model.layers.0.mlp.up_proj.held.0.A"].dtype == torch.float32
    for stage in ("rm", "dpo", "ppo"):
        assert not (out / stage / "model.safetensors").exists()
        assert {t.dtype for t in load_file(out / stage / "adapter.safetensors").values()} == {torch.float32}
    exported = load_file(out / "hf" / "mpo" / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert json.loads((out / "hf" / "mpo" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf" / "mpo").eval()
    ours = load_checkpoint(out / "ppo", kind="gpt")[0].eval().to(torch.bfloat16)
    tokenizer = Tokenizer.load(out / "hf" / "mpo" / "tokenizer.json")
    prompt = torch.tensor([tokenizer.encode("\n\nHuman: Hi?\n\nAssistant:")])
    with torch.no_grad():
        assert (hf(prompt).logits.float() - ours(prompt)).abs().max() < 0.05


@pytest.mark.parametrize("masked", ["causal", "padding", "cache"])
def test_grouped_attention_copies_no_key_and_equals_repeating_them(masked):
    """llama.grouped_attention against the plain form (each key/value head repeated for its query
    heads): causal rows without a mask (SDPA's enable_gqa), a padding mask, a KV cache's decode step."""
    from llama import grouped_attention
    torch.manual_seed(0)
    B, H, KV, T, D = 3, 6, 2, 5, 8
    S = T + 4 if masked == "cache" else T
    q, k, v = (torch.randn(B, n, L, D, dtype=torch.float64) for n, L in ((H, 1 if masked == "cache" else T), (KV, S), (KV, S)))
    mask = None
    if masked != "causal":
        keys = torch.ones(B, S, dtype=torch.bool)
        keys[0, :2] = False
        mask = torch.tril(torch.ones(q.size(2), S, dtype=torch.bool), diagonal=S - q.size(2))[None, None] & keys[:, None, None]
    plain = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1), attn_mask=mask, is_causal=mask is None)
    assert_exact(grouped_attention(q, k, v, mask), plain)  # exact in float64 (tolerance.py): other kernels, other orders
