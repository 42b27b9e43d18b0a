"""Loading without copies (checkpoint.empty and assign): a model is built on the meta device and
takes the file's tensors as its own, with no random initialisation first; the loaded model is the
one the old path gave (a random model built, then the weights copied in), tied weights stay tied,
RoPE's frequencies are computed again; and DPO's frozen reference is freed once it is read."""
import gc
import weakref

import pytest
import torch

from plumbing import checkpoint
from plumbing.checkpoint import load_checkpoint, save_checkpoint
from plumbing.hf import load_hf_gpt2, load_hf_llama, save_hf_gpt2, save_hf_llama
from llama import Llama, LlamaConfig
from model import GPT, GPTConfig

GPT_CFG = GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=16)
LLAMA_CFGS = {
    "tied": LlamaConfig(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                        intermediate_size=24),
    "untied, llama3 rope": LlamaConfig(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                                       intermediate_size=24, tie_word_embeddings=False, rope_theta=5e5,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def old_load(make, folder):
    """The old path: a randomly initialised model, then the file's weights copied into it."""
    model = make()
    state = checkpoint.load_weights(f"{folder}/model.safetensors")
    model.load_state_dict(state, strict=False)
    return model


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for (k, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):  # RoPE's frequencies: not in a state dict
        assert torch.equal(x, y), k


def logits_equal(a, b, vocab=61):
    idx = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(idx)
    mask[0, :3] = 0  # padded: the packed path
    with torch.no_grad():
        assert torch.equal(a(idx, mask), b(idx, mask))


def test_a_gpt_checkpoint_loads_as_the_old_path_did_tied(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(GPT(GPT_CFG), str(tmp_path))
    model, _ = load_checkpoint(str(tmp_path))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter
    assert len(list(model.parameters())) == len(list(GPT(GPT_CFG).parameters()))
    old = old_load(lambda: GPT(GPT_CFG), tmp_path)
    same(model, old)
    logits_equal(model, old)


@pytest.mark.parametrize("name", LLAMA_CFGS)
def test_a_llama_checkpoint_loads_as_the_old_path_did_with_its_rope_frequencies(tmp_path, name):
    torch.manual_seed(0)
    save_checkpoint(Llama(LLAMA_CFGS[name]), str(tmp_path))
    model, _ = load_checkpoint(str(tmp_path))
    assert model.inv_freq.device.type == "cpu"  # computed again, not left on the meta device
    old = old_load(lambda: Llama(LLAMA_CFGS[name]), tmp_path)
    same(model, old)
    logits_equal(model, old)


def test_a_reward_model_from_a_policy_folder_gets_the_backbone_and_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(GPT(GPT_CFG), str(tmp_path))
    rm, _ = load_checkpoint(str(tmp_path), kind="scalar")
    same(rm.gpt, old_load(lambda: GPT(GPT_CFG), tmp_path))
    assert rm.head.weight.std() > 0 and torch.equal(rm.head.bias, torch.zeros(1))
    assert not any(p.is_meta for p in rm.parameters())


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_a_hugging_face_folder_loads_as_the_old_path_did(tmp_path, layout):
    torch.manual_seed(0)
    if layout == "gpt2":
        save_hf_gpt2(GPT(GPT_CFG), str(tmp_path))
        model, make = load_hf_gpt2(str(tmp_path)), lambda: GPT(GPT_CFG)
        assert model.lm_head.weight is model.transformer.wte.weight
        assert all(p.is_contiguous() for p in model.parameters())  # Conv1D's transposes laid out as nn.Linear's
    else:
        save_hf_llama(Llama(LLAMA_CFGS["untied, llama3 rope"]), str(tmp_path))
        model, make = load_hf_llama(str(tmp_path)), lambda: Llama(LLAMA_CFGS["untied, llama3 rope"])
    reference = make()
    reference.load_state_dict(model.state_dict())  # the same weights through a copy into a built model
    same(model, reference)
    logits_equal(model, reference)


@pytest.mark.parametrize("kind", ["gpt", "scalar"])
def test_loading_draws_no_random_initialisation(tmp_path, kind):
    """The old path built a randomly initialised model first (every weight drawn, then overwritten):
    loading now leaves the global random stream untouched (but for a reward model's fresh head) and
    initialises nothing off the meta device."""
    torch.manual_seed(0)
    save_checkpoint(GPT(GPT_CFG), str(tmp_path))
    inits = []
    real = torch.nn.init.normal_

    def spy(tensor, *args, **kwargs):
        inits.append(tensor.device.type)
        return real(tensor, *args, **kwargs)
    state = torch.get_rng_state()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.nn.init, "normal_", spy)
        load_checkpoint(str(tmp_path), kind=kind)
    assert [d for d in inits if d != "meta"] == ([] if kind == "gpt" else ["cpu"])  # the head's alone
    if kind == "gpt":
        assert torch.equal(torch.get_rng_state(), state)


def test_dpos_reference_is_freed_before_training(tmp_path, monkeypatch):
    """mpo.dpo_stage reads the frozen reference once, for its log-probs, and keeps no reference to
    it: while DPO trains, the reference model is gone."""
    import dpo
    import mpo
    from dpo import DPOConfig
    from plumbing.tokenizer import Tokenizer
    texts = ["\n\nHuman: Hi\n\nAssistant: Hello there.", "\n\nHuman: Sky?\n\nAssistant: Blue."] * 10
    tok = Tokenizer.train(texts, 300)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    save_checkpoint(GPT(cfg), str(tmp_path / "init"))
    save_checkpoint(GPT(cfg), str(tmp_path / "ref"))
    loaded, alive_in_training = [], []
    real_load, real_fit = mpo.load_checkpoint, dpo.fit

    def load(*args, **kwargs):
        model, info = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, info

    def fit(*args, **kwargs):
        gc.collect()
        alive_in_training.append(sum(r() is not None for r in loaded))
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(mpo, "load_checkpoint", load)
    monkeypatch.setattr(dpo, "fit", fit)
    records = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello there.", "rejected": " Blue."}] * 8
    mpo.dpo_stage(str(tmp_path / "init"), str(tmp_path / "ref"), records, records[:2], DPOConfig(epochs=1, batch_size=4),
                  str(tmp_path / "dpo"), tok, 8)
    assert len(loaded) == 2 and alive_in_training == [1]  # the policy alone


# ----------------------------------------------------------------------------- loading in the dtype held

BIG = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)


def peak_of_loading(load, monkeypatch):
    """The peak bytes of tensor storage alive while load() runs, the tensors read from a file counted
    from when they are read (peak_memory.PeakMemory counts what ops make), and load()'s result."""
    from bench.peak_memory import PeakMemory
    tracker, real_open = PeakMemory(), checkpoint.safe_open

    class Counted:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            t = self.file.get_tensor(key)
            tracker.count(t)
            return t
    monkeypatch.setattr(checkpoint, "safe_open", Counted)
    with tracker:
        model = load()
    return tracker.peak, model


def nbytes(model, dtype=None):
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters())


@pytest.mark.parametrize("layout", ["checkpoint", "hugging face"])
def test_a_frozen_model_is_read_in_its_dtype_without_its_float32_copy(tmp_path, monkeypatch, layout):
    """A model held in bf16 (frozen, or the base under adapters) is read straight into bf16, a tensor at
    a time: its weights equal the float32 model's cast, and the peak while loading is the bf16 model and
    about one float32 tensor, where loading in float32 and casting after holds the float32 model whole."""
    torch.manual_seed(0)
    if layout == "checkpoint":
        save_checkpoint(GPT(BIG), str(tmp_path))
        load = lambda dtype: load_checkpoint(str(tmp_path), kind="gpt", dtype=dtype)[0]
    else:
        save_hf_gpt2(GPT(BIG), str(tmp_path))
        load = lambda dtype: load_hf_gpt2(str(tmp_path), dtype=dtype)
    peak, held = peak_of_loading(lambda: load(torch.bfloat16), monkeypatch)
    old_peak, old = peak_of_loading(lambda: load(torch.float32).to(torch.bfloat16), monkeypatch)
    same(held, old)
    fp32 = nbytes(old, torch.float32)
    largest = max(p.numel() for p in old.parameters()) * 4
    assert old_peak >= fp32  # the meter sees the float32 copy when there is one
    assert peak <= nbytes(held) + 2 * largest < fp32


def test_each_stage_reads_its_models_in_the_dtype_it_holds_them_in(tmp_path, monkeypatch):
    """A bf16 run with adapters on every stage after SFT holds every model it loads in bf16 (the
    trained ones' frozen bases; the frozen reward model, references and evaluated policies): every
    weight file is read in bf16.
    Without adapters, the models a stage trains are read in float32, the master copy, and the frozen
    ones in bf16."""
    from cli import run_train
    reads, real = [], checkpoint.load_weights

    def spy(path, device="cpu", dtype=None):
        reads.append((str(path).split("/")[-2:], dtype))
        return real(path, device, dtype)
    monkeypatch.setattr(checkpoint, "load_weights", spy)
    small = ["--preset", "micro", "--dtype", "bf16", "--n-sft", "100", "--n-pref", "60", "--sft-steps", "2",
             "--rm-epochs", "1", "--ppo-iterations", "1", "--ppo-rollouts", "4", "--eval-prompts", "4",
             "--eval-samples", "1", "--easy-fraction", "0.5"]
    proc = run_train(*small, "--out", tmp_path / "lora", "--lora-rank", "2", "--lora-stages", "rm,dpo,ppo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    models = [(where, dtype) for where, dtype in reads if where[1] == "model.safetensors"]
    assert models and {dtype for _, dtype in models} == {torch.bfloat16}, models
    reads.clear()
    proc = run_train(*small, "--out", tmp_path / "full", "--stages", "tokenizer,sft,rm,split,dpo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # rm: SFT's weights, trained (float32); split: the reward model, frozen; dpo: its policy, trained,
    # then SFT as its reference, frozen
    assert reads == [(["sft", "model.safetensors"], torch.float32), (["rm", "model.safetensors"], torch.bfloat16),
                     (["sft", "model.safetensors"], torch.float32), (["sft", "model.safetensors"], torch.bfloat16)]


def test_a_weight_beyond_fp16s_range_is_named_when_read_in_fp16(tmp_path):
    """fp16 holds at most 65504: a finite float32 weight above it would become inf, so a frozen model
    read in fp16 (--dtype fp16) names the tensor and the way out, in one line."""
    model = GPT(GPT_CFG)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 7e4
    save_checkpoint(model, str(tmp_path))
    assert load_checkpoint(str(tmp_path), dtype=torch.bfloat16)[0]  # bf16 has float32's range
    with pytest.raises(checkpoint.CheckpointError, match=r"'transformer.h.0.mlp.c_fc.weight' holds values beyond "
                       r"fp16's range \(65504\): use --dtype bf16"):
        load_checkpoint(str(tmp_path), dtype=torch.float16)
