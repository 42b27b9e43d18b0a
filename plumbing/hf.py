"""Hugging Face folders of the GPT-2, Llama and Qwen2 layouts, both ways: --init's weights in
(checked with their tokenizer before any work, check_init), --export-hf's folders out, which
transformers loads. Through safetensors only (never pickle).
"""
import dataclasses
import json
import os
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plumbing.checkpoint import (CheckpointError, assign, check_config, check_finite, empty, file_sha256, load_checkpoint,
                        load_weights, read_config_json, weight_files)
from plumbing.files import DataError, atomic_write, write_text
from llama import Llama, LlamaConfig, rope_scaling_problem
from lora import merge, missing_target
from model import GPT, GPTConfig
from plumbing.tokenizer import Tokenizer


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def storage_dtype(path):
    """The dtype a folder's weights are stored in, its first floating-point tensor's (bf16 for most
    checkpoints on the Hugging Face hub): what an export of a model trained from it writes."""
    for file in weight_files(path):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                kind = f.get_slice(key).get_dtype()
                if kind in SAFETENSORS_DTYPES:
                    return SAFETENSORS_DTYPES[kind]
    return torch.float32


# ----------------------------------------------------------------------------- GPT-2 import/export

# Hugging Face GPT-2 stores these as Conv1D, (in, out): the transpose of nn.Linear's (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(path, device="cpu", dtype=torch.float32):
    """A GPT from a Hugging Face GPT-2 folder (config.json + model.safetensors), e.g. gpt2, its weights
    in dtype (checkpoint.load_checkpoint's)."""
    files = {name: os.path.join(path, name) for name in ("config.json", "model.safetensors")}
    hf = read_config_json(files["config.json"])
    try:
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions") or hf["n_ctx"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           bias=True)  # dropout stays at 0.0, this project's default
    except KeyError as e:
        raise CheckpointError(f"{files['config.json']}: missing field {e}") from None
    check_config(config, files["config.json"])
    # model.py has GPT-2's LayerNorm eps (1e-5) and GELU (tanh approximation, "gelu_new")
    if (abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12
            or hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")):
        raise CheckpointError(f"{files['config.json']}: only layer_norm_epsilon 1e-5 and "
                              "activation_function gelu_new are supported")
    hf_state = check_finite(load_weights(files["model.safetensors"], device, dtype), files["model.safetensors"])
    model = empty(lambda: GPT(config))  # no random initialisation: the weights are the file's
    state = {}
    for key, ours in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte
        short = key[len("transformer."):]
        if key not in hf_state and short not in hf_state:
            raise CheckpointError(f"{files['model.safetensors']}: missing key {key!r}")
        w = hf_state.pop(key) if key in hf_state else hf_state.pop(short)  # the file's copy gone once read
        w = w.t().contiguous() if key.endswith(_CONV1D) else w
        if w.shape != ours.shape:
            raise CheckpointError(f"{files['model.safetensors']}: {key!r} has shape {tuple(w.shape)}, "
                             f"config.json needs {tuple(ours.shape)}")
        state[key] = w
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise CheckpointError(f"{files['model.safetensors']}: lm_head.weight is not tied to wte")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    assign(model, state)  # buffers such as attn.bias / attn.masked_bias are ignored; lm_head tied again
    return model


def save_hf_gpt2(gpt, path, eos_id=None):
    """Write a GPT as a Hugging Face GPT-2 folder that GPT2LMHeadModel.from_pretrained reads.

    eos_id (default vocab_size - 1, GPT-2's <|endoftext|> slot) becomes bos/eos_token_id.
    """
    write_hf(path, *gpt2_layout(gpt, eos_id))


def write_hf(path, state, config):
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text(os.path.join(path, "config.json"), json.dumps(config, indent=2))


def gpt2_layout(gpt, eos_id=None):
    """A GPT's (state, config.json) in GPT-2's layout (save_hf_gpt2)."""
    c = gpt.config
    if not c.bias:
        raise ValueError("GPT-2 has biases: a model with bias=False cannot be saved as GPT-2")
    state = {k: (v.t() if k.endswith(_CONV1D) else v).detach().contiguous().cpu()
             for k, v in gpt.state_dict().items() if k != "lm_head.weight"}  # transformers ties it
    eos_id = c.vocab_size - 1 if eos_id is None else eos_id
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_embd": c.n_embd, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new", "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
              "attn_pdrop": c.dropout, "initializer_range": 0.02, "tie_word_embeddings": True,
              "torch_dtype": str(next(gpt.parameters()).dtype).removeprefix("torch."),
              "bos_token_id": eos_id, "eos_token_id": eos_id}
    return state, config


# ----------------------------------------------------------------------------- Llama and Qwen2 import/export

HF_LLAMA = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # model_type: the class transformers builds


def llama_config_from_hf(hf, file):
    """A LlamaConfig from a Hugging Face config.json of model_type llama or qwen2; a field missing,
    of the wrong type or asking for what llama.py does not do is a CheckpointError naming it."""
    def field(key, default=None, kind=int):
        value = hf.get(key, default)
        if value is None:
            raise CheckpointError(f"{file}: missing field {key!r}")
        if kind is int and (type(value) is not int or value <= 0):
            raise CheckpointError(f"{file}: field {key!r} must be a positive integer, not {value!r}")
        if kind is float and (type(value) not in (int, float) or value <= 0):
            raise CheckpointError(f"{file}: field {key!r} must be a positive number, not {value!r}")
        return value
    for key, wanted in (("hidden_act", "silu"), ("mlp_bias", False), ("use_sliding_window", False),
                        ("partial_rotary_factor", 1.0)):
        if hf.get(key, wanted) != wanted:
            raise CheckpointError(f"{file}: field {key!r} is {hf[key]!r}; only {wanted!r} is supported")
    # Hugging Face writes rope_theta and rope_scaling (transformers 4) or rope_parameters (5)
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{file}: field 'rope_scaling' must be an object, not {scaling!r}")
    if rope_scaling_problem(scaling):
        raise CheckpointError(f"{file}: {rope_scaling_problem(scaling)}")
    n_head, n_embd = field("num_attention_heads"), field("hidden_size")
    qwen2 = hf["model_type"] == "qwen2"
    return LlamaConfig(
        vocab_size=field("vocab_size"), block_size=field("max_position_embeddings"),
        n_layer=field("num_hidden_layers"), n_head=n_head, n_embd=n_embd,
        n_kv_head=field("num_key_value_heads", n_head), head_dim=hf.get("head_dim") or field("hidden_size") // n_head,
        intermediate_size=field("intermediate_size"), rms_norm_eps=field("rms_norm_eps", 1e-6, float),
        rope_theta=field("rope_theta", rope.get("rope_theta", 10000.0), float),
        rope_scaling=scaling if scaling.get("rope_type", scaling.get("type", "default")) != "default" else None,
        qkv_bias=qwen2 or bool(hf.get("attention_bias")), o_bias=not qwen2 and bool(hf.get("attention_bias")),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers' default: untied
        model_type=hf["model_type"])


def load_hf_llama(path, device="cpu", classifier=False, dtype=torch.float32):
    """A Llama from a Hugging Face folder of model_type llama or qwen2: config.json and
    model.safetensors, or shards listed in model.safetensors.index.json. The weights come in dtype
    (checkpoint.load_checkpoint's: float32, the master copy a stage trains, though the files are
    often bf16). classifier: the body of a *ForSequenceClassification folder, which has a score head
    (plumbing/hf_reward.py) and no lm_head."""
    file = os.path.join(path, "config.json")
    hf = read_config_json(file)
    if hf.get("model_type") not in HF_LLAMA:
        raise CheckpointError(f"{file}: field 'model_type' is {hf.get('model_type')!r}, not {' or '.join(HF_LLAMA)}")
    config = check_config(llama_config_from_hf(hf, file), file)
    if classifier:  # no vocabulary projection to hold: the body alone
        config = dataclasses.replace(config, tie_word_embeddings=True)
    files = weight_files(path)
    hf_state, where = {}, {}
    for f in files:
        for k, v in check_finite(load_weights(f, device, dtype), f).items():
            hf_state[k], where[k] = v, f
    model = empty(lambda: Llama(config))  # no random initialisation: the weights are the file's
    named = files[0] if len(files) == 1 else os.path.join(path, "model.safetensors.index.json")
    state = {}
    for key, ours in model.state_dict().items():
        theirs = "lm_head.weight" if key == "unembed.weight" else key  # llama.Llama says why
        if theirs not in hf_state:
            raise CheckpointError(f"{named}: missing key {theirs!r}")
        w = hf_state.pop(theirs)
        if w.shape != ours.shape:
            raise CheckpointError(f"{where[theirs]}: {theirs!r} has shape {tuple(w.shape)}, "
                                  f"config.json needs {tuple(ours.shape)}")
        state[key] = w
    head = hf_state.pop("lm_head.weight", None)  # tied: transformers may still write it
    if head is not None and not torch.equal(head, state["model.embed_tokens.weight"]):
        raise CheckpointError(f"{where['lm_head.weight']}: lm_head.weight differs from model.embed_tokens.weight, "
                              "but config.json says tie_word_embeddings")
    extra = [k for k in hf_state if not k.endswith("rotary_emb.inv_freq")  # old files store RoPE's table
             and not (classifier and k == "score.weight")]
    if extra:
        raise CheckpointError(f"{where[extra[0]]}: unexpected key {extra[0]!r} (config.json does not ask for it)")
    assign(model, state)  # RoPE's frequencies computed again
    return model


def hf_llama_config(c, eos_id=None, bos_id=None, pad_id=None, dtype=torch.float32):
    """The Hugging Face config.json (a dict) of a LlamaConfig, in the layout of its model_type."""
    qwen2 = c.model_type == "qwen2"
    if c.model_type not in HF_LLAMA:
        raise ValueError(f"model_type {c.model_type!r}: llama or qwen2")
    if qwen2 and (not c.qkv_bias or c.o_bias):
        raise ValueError("Qwen2 has biases on q, k and v and none on o_proj: this model cannot be saved as qwen2")
    if not qwen2 and c.qkv_bias != c.o_bias:
        raise ValueError("Llama's attention_bias puts biases on q, k, v and o_proj together: save as qwen2")
    return {"model_type": c.model_type, "architectures": [HF_LLAMA[c.model_type]], "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
            "max_position_embeddings": c.block_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling, "hidden_act": "silu", "attention_dropout": 0.0,
            "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
            **({"use_sliding_window": False} if qwen2 else {"attention_bias": c.qkv_bias, "mlp_bias": False}),
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}


def save_hf_llama(model, path, eos_id=None, bos_id=None, pad_id=None):
    """Write a Llama as a Hugging Face folder of its model_type (llama or qwen2) that
    AutoModelForCausalLM.from_pretrained reads: config.json and model.safetensors, in the model's dtype."""
    write_hf(path, *llama_layout(model, eos_id, bos_id, pad_id))


def llama_layout(model, eos_id=None, bos_id=None, pad_id=None):
    """A Llama's (state, config.json) in the layout of its model_type (save_hf_llama)."""
    config = hf_llama_config(model.config, eos_id, bos_id, pad_id, next(model.parameters()).dtype)
    state = {("lm_head.weight" if k == "unembed.weight" else k): v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}  # tied: no lm_head, transformers ties it
    return state, config


def hf_layout(model, eos_id=None, pad_id=None):
    """A policy's (state, config.json) in the Hugging Face layout of its own: GPT-2 for a GPT, llama
    or qwen2 (the layout it was imported from) for a Llama."""
    return llama_layout(model, eos_id, pad_id=pad_id) if isinstance(model, Llama) else gpt2_layout(model, eos_id)


def save_hf(model, path, eos_id=None, pad_id=None):
    """A policy as the Hugging Face folder of its own layout (hf_layout)."""
    write_hf(path, *hf_layout(model, eos_id, pad_id))


def save_hf_classifier(reward_model, path, eos_id=None, pad_id=None):
    """A reward model (a ScalarModel) as the Hugging Face sequence classifier of its backbone's
    layout (GPT2-, Llama- or Qwen2ForSequenceClassification, one label), which
    AutoModelForSequenceClassification reads and --reward-model takes back: the backbone as
    hf_layout writes it, without its vocabulary projection, and the head as `score`. transformers
    reads the score at the rightmost token that is not pad_id, as this project reads it at the
    last real token when the padding token is not the end-of-sequence one. Its score has no bias:
    the exported scores are this project's less the head's bias, a constant (the centring, see
    reward.train_reward_model), so every difference between two texts, and so every preference,
    the split and the Bradley-Terry loss, is the same."""
    body = reward_model.gpt
    state, config = hf_layout(body, eos_id, pad_id)
    state.pop("lm_head.weight", None)  # an untied Llama's: a classifier has none
    state["score.weight"] = reward_model.head.weight.detach().to(next(body.parameters()).dtype).contiguous().cpu()
    name = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2"}[config["model_type"]]
    config.update(architectures=[f"{name}ForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, pad_token_id=pad_id)
    write_hf(path, state, config)


def load_gpt(path, device="cpu", dtype=torch.float32):
    """A policy (--init) from a checkpoint folder of this project or a Hugging Face folder whose
    config.json's model_type is gpt2 (or none), llama or qwen2, its weights in dtype."""
    file = os.path.join(path, "config.json")
    info = read_config_json(file)
    if "kind" in info:
        return load_checkpoint(path, kind="gpt", device=device, dtype=dtype)[0]
    model_type = info.get("model_type", "gpt2")
    if model_type in HF_LLAMA:
        return load_hf_llama(path, device=device, dtype=dtype)
    if model_type != "gpt2":
        raise CheckpointError(f"{file}: model_type {model_type!r} is not supported: gpt2, {', '.join(HF_LLAMA)}")
    return load_hf_gpt2(path, device=device, dtype=dtype)


def export_hf(out, policies, dtype=torch.float32, reward_model=True):
    """Each final policy ({method: stage folder}) as a folder that transformers loads, OUT/hf/METHOD:
    GPT-2's layout for a GPT, llama or qwen2 (as imported) for a Llama, in `dtype` (--init's: bf16
    in, bf16 out); and with reward_model (the rm stage ran: no --reward-model), the reward model as a
    sequence classifier, OUT/hf/reward_model (save_hf_classifier)."""
    tokenizer = Tokenizer.load(os.path.join(out, "tokenizer", "tokenizer.json"))
    for method, stage in policies.items():
        folder = os.path.join(out, "hf", method)
        # adapters merged in dtype: in bf16 rounded once, as PEFT's merge_and_unload rounds a bf16 model
        policy = merge(load_checkpoint(os.path.join(out, stage), kind="gpt", dtype=dtype)[0])
        save_hf(policy, folder, tokenizer.eos_id, tokenizer.pad_id)
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
    names = list(policies)
    if reward_model:
        folder = os.path.join(out, "hf", "reward_model")
        save_hf_classifier(merge(load_checkpoint(os.path.join(out, "rm"), kind="scalar", dtype=dtype)[0]), folder,
                           tokenizer.eos_id, tokenizer.pad_id)
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
        names.append("reward_model")
        if tokenizer.pad_id == tokenizer.eos_id:
            print(f"{folder}: the padding token is the end-of-sequence one, so transformers reads the score "
                  "one token before a final end of sequence, where this project reads it at the end of sequence")
    print(f"Hugging Face folders for transformers: {os.path.join(out, 'hf')}/{{{','.join(names)}}}")


# ----------------------------------------------------------------------------- --init, checked

class Init(NamedTuple):
    """--init, checked before anything is written: its folder, the tokenizer its weights were
    trained with, its context, the content hash of its weights (part of every fingerprint) and the
    dtype they are stored in (--export-hf writes that one)."""
    path: str
    tokenizer: str
    block_size: int
    sha256: str
    dtype: torch.dtype = torch.float32


def check_init(path, lora, max_new_tokens):
    """--init's folder `path`, loaded once before anything is written: its weights, its tokenizer,
    the adapters' targets (lora: a LoRAConfig) and the context must agree. Returns an Init, or None
    without --init."""
    if not path:
        return None
    model = load_gpt(path, "cpu", dtype=None)  # as stored: checked here, trained by the stages
    wrong = missing_target(model, lora.targets) if lora.rank else None
    if wrong:
        raise DataError(f"--lora-targets {lora.targets}: {wrong} ({path})")
    # the tokenizer the weights were trained with: beside them (Hugging Face), or the run's own
    candidates = [os.path.join(path, "tokenizer.json"), os.path.join(path, "..", "tokenizer", "tokenizer.json")]
    tok_path = next((c for c in candidates if os.path.exists(c)), None)
    if tok_path is None:
        raise DataError(f"{path}: no tokenizer.json beside the weights; --init needs the tokenizer "
                             "the model was trained with")
    tokenizer = Tokenizer.load(tok_path)  # its end-of-sequence and padding tokens: the folder's configs'
    vocab = tokenizer.vocab_size
    if vocab > model.config.vocab_size:
        raise DataError(f"{tok_path}: {vocab} tokens, more than the {model.config.vocab_size} of the "
                             f"model's config.json")
    if max_new_tokens >= model.config.block_size:
        raise DataError(f"{path}/config.json: context {model.config.block_size} leaves no room for prompts")
    name = tokenizer.tok.id_to_token
    print(f"--init {path}: {type(model).__name__}, end of sequence {name(tokenizer.eos_id)!r} "
          f"({tokenizer.eos_id}), padding {name(tokenizer.pad_id)!r} ({tokenizer.pad_id})")
    return Init(path, tok_path, model.config.block_size, file_sha256(path), storage_dtype(path))
