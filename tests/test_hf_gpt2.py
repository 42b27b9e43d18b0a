"""GPT-2 import/export: the same logits as transformers both ways, left padding, clear errors."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from plumbing.hf import load_hf_gpt2, save_hf_gpt2
from model import GPT, GPTConfig
from tolerance import network_atol

transformers = pytest.importorskip("transformers")


def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture
def hf_folder(tmp_path):
    hf_model().save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def hf_logits(hf, idx, mask=None):
    if mask is None:
        return hf(idx).logits
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return hf(idx, attention_mask=mask, position_ids=position_ids).logits


@torch.no_grad()
def test_load_hf_gpt2_matches_transformers(hf_folder):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    gpt = load_hf_gpt2(hf_folder).eval()
    idx = torch.randint(0, 100, (3, 20))
    theirs = hf_logits(hf, idx)
    assert (gpt(idx) - theirs).abs().max() < network_atol(theirs, 4 * 32, 2)  # from magnitudes (tolerance.py)


@torch.no_grad()
def test_save_hf_gpt2_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    save_hf_gpt2(gpt, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 100, (3, 20))
    theirs = hf_logits(hf, idx)
    assert (gpt(idx) - theirs).abs().max() < network_atol(theirs, 4 * 32, 2)  # from magnitudes (tolerance.py)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary files left


@torch.no_grad()
def test_left_padding_matches_transformers(hf_folder):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    gpt = load_hf_gpt2(hf_folder).eval()
    idx = torch.randint(0, 100, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    real = mask.bool()
    theirs = hf_logits(hf, idx, mask)[real]
    assert (gpt(idx, mask)[real] - theirs).abs().max() < network_atol(theirs, 4 * 32, 2)  # from magnitudes (tolerance.py)


def test_missing_file_is_a_clear_error(hf_folder):
    os.remove(hf_folder / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_gpt2(hf_folder)


def test_wrong_shape_names_the_key(hf_folder):
    state = load_file(hf_folder / "model.safetensors")
    key = next(k for k in state if k.endswith("h.1.mlp.c_fc.bias"))
    state[key] = torch.zeros(7)
    save_file(state, hf_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias.*\(7,\).*\(128,\)"):
        load_hf_gpt2(hf_folder)


def test_missing_key_names_the_key(hf_folder):
    state = load_file(hf_folder / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.endswith("ln_f.weight")}
    save_file(state, hf_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="ln_f.weight"):
        load_hf_gpt2(hf_folder)
