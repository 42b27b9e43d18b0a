"""A model's weights on disk, through safetensors only (never pickle): this project's checkpoint
folders (model.safetensors + config.json) and Hugging Face GPT-2 folders, both ways.
"""
import hashlib
import json
import os
from dataclasses import asdict

import torch
from safetensors.torch import load_file, save_file

from data import DataError, UserError, atomic_write, read_json, write_text
from model import GPT, GPTConfig, ScalarModel


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded: the message names the file and the key."""


def save_checkpoint(model, folder, **extra):
    """model.safetensors + config.json. extra (e.g. a reward offset) goes into config.json."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.endswith("lm_head.weight")}  # tied to wte: stored once
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    atomic_write(os.path.join(folder, "model.safetensors"), lambda p: save_file(state, p))
    config = {"kind": kind, "model": asdict(model.config), **extra}
    write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2))


def file_sha256(folder):
    """The content hash of a checkpoint folder's weights: what a stage's fingerprint records."""
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_config_json(path):
    """A config.json as a dict; a missing file or bad JSON raises CheckpointError naming it."""
    try:
        info = read_json(path)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, not {type(info).__name__}")
    return info


def read_checkpoint_config(folder):
    path = os.path.join(folder, "config.json")
    info = read_config_json(path)
    for key, kind in (("kind", str), ("model", dict)):
        if not isinstance(info.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    return info


def check_config(config, path):
    """Shapes a GPT can be built from, or a CheckpointError naming the config file and the field."""
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = getattr(config, key)
        if type(value) is not int or value <= 0:
            raise CheckpointError(f"{path}: field {key!r} must be a positive integer, not {value!r}")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{path}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    return config


def load_weights(path, device="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors' own error, on one line
        raise CheckpointError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None


def load_checkpoint(folder, kind=None, device="cpu"):
    """Load a folder written by save_checkpoint. kind="scalar" from a "gpt" folder gives a
    scalar model whose backbone is that GPT (the reward model starts from SFT); kind="gpt" from
    a "scalar" folder gives its backbone. Weights only ever come through safetensors."""
    info = read_checkpoint_config(folder)
    try:
        config = check_config(GPTConfig(**info["model"]), f"{folder}/config.json")
    except TypeError as e:
        raise CheckpointError(f"{folder}/config.json: field 'model': {e}") from None
    state = load_weights(os.path.join(folder, "model.safetensors"), device)
    kind = kind or info["kind"]
    if info["kind"] == "scalar" and kind == "gpt":
        state = {k[len("gpt."):]: v for k, v in state.items() if k.startswith("gpt.")}
    model = ScalarModel(config) if kind == "scalar" else GPT(config)
    if info["kind"] == "gpt" and kind == "scalar":
        state = {"gpt." + k: v for k, v in state.items()}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a size mismatch: name the first offending tensor, in one line
        detail = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), str(e))
        raise CheckpointError(f"{folder}/model.safetensors: shapes do not match config.json: {detail}") from None
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: checkpoint does not match its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device), info


# ----------------------------------------------------------------------------- GPT-2 import/export

# Hugging Face GPT-2 stores these as Conv1D, (in, out): the transpose of nn.Linear's (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(path, device="cpu"):
    """A GPT from a Hugging Face GPT-2 folder (config.json + model.safetensors), e.g. gpt2."""
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
    hf_state = load_weights(files["model.safetensors"])
    model = GPT(config)
    state = {}
    for key, ours in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte
        short = key[len("transformer."):]
        if key not in hf_state and short not in hf_state:
            raise CheckpointError(f"{files['model.safetensors']}: missing key {key!r}")
        w = hf_state.get(key, hf_state.get(short))
        w = w.t() if key.endswith(_CONV1D) else w
        if w.shape != ours.shape:
            raise CheckpointError(f"{files['model.safetensors']}: {key!r} has shape {tuple(w.shape)}, "
                             f"config.json needs {tuple(ours.shape)}")
        state[key] = w
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise CheckpointError(f"{files['model.safetensors']}: lm_head.weight is not tied to wte")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)  # buffers such as attn.bias / attn.masked_bias are ignored
    return model.to(device)


def save_hf_gpt2(gpt, path, eos_id=None):
    """Write a GPT as a Hugging Face GPT-2 folder that GPT2LMHeadModel.from_pretrained reads.

    eos_id (default vocab_size - 1, GPT-2's <|endoftext|> slot) becomes bos/eos_token_id.
    """
    c = gpt.config
    if not c.bias:
        raise ValueError("GPT-2 has biases: a model with bias=False cannot be saved as GPT-2")
    os.makedirs(path, exist_ok=True)
    state = {k: (v.t() if k.endswith(_CONV1D) else v).detach().contiguous().cpu()
             for k, v in gpt.state_dict().items() if k != "lm_head.weight"}  # transformers ties it
    eos_id = c.vocab_size - 1 if eos_id is None else eos_id
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_embd": c.n_embd, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new", "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
              "attn_pdrop": c.dropout, "initializer_range": 0.02, "tie_word_embeddings": True,
              "bos_token_id": eos_id, "eos_token_id": eos_id}
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text(os.path.join(path, "config.json"), json.dumps(config, indent=2))


def load_gpt(path, device="cpu"):
    """A policy from a Hugging Face GPT-2 folder or a checkpoint folder of this project (--init)."""
    if "kind" in read_config_json(os.path.join(path, "config.json")):
        return load_checkpoint(path, kind="gpt", device=device)[0]
    return load_hf_gpt2(path, device=device)
