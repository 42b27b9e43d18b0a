"""Sampling paths agree token for token; mixed precision and torch.compile, on the CPU (the micro
pipeline end to end) and on CUDA (skips without a GPU); a Llama held in bf16 keeps float32 RoPE
frequencies and the float32 model's log-probs at 1,024 tokens."""
import copy
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import sampling
import train
import training
from plumbing.checkpoint import load_checkpoint, save_checkpoint
from llama import Llama, LlamaConfig, rope_frequencies
from lora import LoRAConfig
from model import GPT, GPTConfig
from sampling import autocast_dtype, categorical, generate
from tolerance import network_atol
from training import Memory, autocast, grad_scaler, optimizer_step

CFG = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU_FP16 = hasattr(torch.amp, "GradScaler")  # fp16 on the CPU needs torch.amp.GradScaler (torch >= 2.3)
# the fewest steps that still run every stage of the micro pipeline
MICRO = ["--preset", "micro", "--device", "cpu", "--n-sft", "64", "--n-pref", "64", "--sft-steps", "2",
         "--rm-epochs", "1", "--ppo-iterations", "2", "--ppo-rollouts", "4", "--max-new-tokens", "8",
         "--eval-prompts", "4", "--eval-samples", "1"]


@torch.no_grad()
def sample_by_recomputing(model, prompt, n, generator):
    """The plain path: a full forward over the whole prefix per token, the same sampler."""
    seq = prompt
    for _ in range(n):
        probs = model(seq)[:, -1].softmax(-1)
        seq = torch.cat([seq, categorical(probs, generator)[:, None]], 1)
    return seq[:, prompt.size(1):]


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_sampling_gives_the_plain_paths_tokens(device):
    torch.manual_seed(0)
    # in float64 (tolerance.py): the cached and recomputed logits sum in other orders, and a draw at a
    # boundary of the sampler would take another token in float32
    model = GPT(CFG).to(device, torch.float64).eval()
    prompt = torch.randint(0, CFG.vocab_size, (8, 10), device=device)
    fast, _ = generate(model, prompt, None, 20, generator=torch.Generator(device).manual_seed(3))
    plain = sample_by_recomputing(model, prompt, 20, torch.Generator(device).manual_seed(3))
    assert torch.equal(fast, plain)


@cuda_only
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["gpt", "llama-gqa"])
def test_the_cuda_graph_decode_step_gives_the_eager_steps_tokens(layout, dtype, monkeypatch):
    """sampling.Graphed replays the decode step's kernels as one CUDA graph: the tokens of the same
    step run eagerly, under autocast too (the graph on bf16 copies of the float32 weights), in the
    call that captures it and in the next, which replays it; and the capture does not fail (it
    would warn)."""
    torch.manual_seed(0)
    model = (GPT(CFG) if layout == "gpt" else Llama(LlamaConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4,
                                                                n_kv_head=2, n_embd=32, intermediate_size=48)))
    model = model.cuda().eval()
    prompt = torch.randint(1, CFG.vocab_size, (8, 10), device="cuda")
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    runs = {}
    for graphs in (False, True):
        monkeypatch.setattr(sampling, "CUDA_GRAPHS", graphs)
        with warnings.catch_warnings(), autocast("cuda", dtype):
            warnings.simplefilter("error")
            g = torch.Generator("cuda").manual_seed(3)
            runs[graphs] = [generate(model, prompt, mask, 20, eos_id=3, generator=g) for _ in range(2)]
    for replayed, eager in zip(runs[True], runs[False]):
        assert torch.equal(replayed[0], eager[0]) and torch.equal(replayed[1], eager[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_training_lowers_the_loss(device, dtype):
    if device == "cpu" and dtype == "fp16" and not CPU_FP16:
        pytest.skip("fp16 on the CPU needs torch.amp.GradScaler (torch >= 2.3)")
    torch.manual_seed(0)
    model = GPT(CFG).to(device)
    opt = model.configure_optimizers(3e-3, device_type=device)
    scaler = grad_scaler(device, dtype)
    ids = torch.randint(0, CFG.vocab_size, (16, 32), device=device)
    losses = []
    for step in range(30):
        with autocast(device, dtype):
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        optimizer_step(loss, opt, 1.0, scaler, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert next(model.parameters()).dtype == torch.float32  # master weights stay float32


@cuda_only
def test_compiled_training_forward_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    ids = torch.randint(0, CFG.vocab_size, (4, 32), device="cuda")
    compiled = training.compiled(model, True)
    eager = model(ids)  # from magnitudes (tolerance.py): the compiled kernels sum in their own orders
    assert (compiled(ids) - eager).abs().max() < network_atol(eager, 4 * CFG.n_embd, CFG.n_layer)


def test_autocast_dtype_without_deprecated_calls_and_the_kv_cache_follows_it(monkeypatch):
    """generate() keeps its KV cache in the dtype autocast computes in, on the CPU as on CUDA."""
    dtypes = []

    class RecordingCache(sampling.KVCache):
        def __init__(self, config, batch_size, max_len, device, dtype):
            dtypes.append(dtype)
            super().__init__(config, batch_size, max_len, device, dtype)
    monkeypatch.setattr(sampling, "KVCache", RecordingCache)
    model = GPT(CFG).eval()
    prompt = torch.randint(0, CFG.vocab_size, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # torch >= 2.4 deprecates get_autocast_gpu_dtype and kin
        assert autocast_dtype("cpu") is None and autocast_dtype("cuda") is None
        generate(model, prompt, None, 3)
        for dtype in (torch.bfloat16, torch.float16) if CPU_FP16 else (torch.bfloat16,):
            with torch.autocast("cpu", dtype=dtype):
                assert autocast_dtype("cpu") == dtype and autocast_dtype("cuda") is None
                generate(model, prompt, None, 3)
    assert dtypes == [torch.float32, torch.bfloat16, torch.float16][:3 if CPU_FP16 else 2]


def assert_finite_run(out):
    """results.json written, every logged figure finite, every saved model float32."""
    results = json.loads((out / "results.json").read_text())
    assert {"sft", "mpo_stage1", "mpo"} <= set(results["methods"])
    figures = [v for row in results["methods"].values() for v in row.values()]
    for path in out.glob("*/metrics.jsonl"):
        figures += [v for line in path.read_text().splitlines() for v in json.loads(line).values()]
    assert figures and all(math.isfinite(v) for v in figures if isinstance(v, float))
    for path in out.glob("*/model.safetensors"):
        assert {v.dtype for v in load_file(path).values()} == {torch.float32}, path  # master weights stay float32


@pytest.mark.parametrize("dtype", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    not CPU_FP16, reason="fp16 on the CPU needs torch.amp.GradScaler (torch >= 2.3)"))])
@pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")
def test_micro_pipeline_in_mixed_precision_on_the_cpu(dtype, tmp_path):
    train.main([*MICRO, "--dtype", dtype, "--out", str(tmp_path)])
    assert_finite_run(tmp_path)
    assert all((tmp_path / stage / "metrics.jsonl").exists() for stage in ("sft", "rm", "dpo", "ppo"))


def inductor_error():
    """None where torch.compile's default backend works here (inductor: on the CPU it needs a C++
    compiler), else why not, in one line."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as e:  # no compiler, an unsupported platform, ...
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compiled_sft_matches_eager_on_the_cpu(tmp_path):
    """--compile on the micro preset with one block (the other block is the same code), SFT only: a
    cold inductor compile of its forward and backward takes most of this test's time (the whole
    pipeline with --compile runs too, but costs minutes)."""
    reason = inductor_error()
    if reason:
        pytest.skip(f"torch.compile (inductor) does not work here: {reason}")
    flags = [*MICRO, "--stages", "tokenizer,sft", "--n-layer", "1"]
    try:
        train.main([*flags, "--out", str(tmp_path / "eager")])
        train.main([*flags, "--compile", "--out", str(tmp_path / "compiled")])
    finally:
        torch._dynamo.reset()
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "sft" / "metrics.jsonl").open()]
              for run in ("eager", "compiled")}
    # from magnitudes (tolerance.py): inductor's float32 kernels sum in their own orders; the micro preset's MLP
    atol = network_atol(torch.tensor(losses["eager"]), 4 * 64, 2)
    assert len(losses["eager"]) == 2 and losses["compiled"] == pytest.approx(losses["eager"], abs=atol)


def test_tf32_serves_the_float32_heads_under_mixed_precision_on_cuda_alone():
    """training.float32_matmuls: TF32 ("high") for CUDA under bf16 or fp16; true FP32 ("highest")
    with --dtype fp32 and on the CPU. And bench.tf32 rounds to 10 mantissa bits."""
    from bench import figures as bench
    from training import float32_matmuls
    before = torch.get_float32_matmul_precision()
    try:
        assert float32_matmuls("cuda", "bf16") == "high" == torch.get_float32_matmul_precision()
        assert float32_matmuls("cuda:1", "fp16") == "high"
        assert float32_matmuls("cuda", "fp32") == "highest" == torch.get_float32_matmul_precision()
        assert float32_matmuls("cpu", "bf16") == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    x = torch.tensor([1 + 2 ** -10, 1 + 2 ** -11 + 2 ** -12, 1 + 2 ** -12, -3.0])
    assert bench.tf32(x).tolist() == [1 + 2 ** -10, 1 + 2 ** -10, 1.0, -3.0]


def position_sensitive_llama(T=1024):
    """A one-layer Llama of Qwen2.5's attention shape (RoPE theta 1e6, head dim 64, grouped-query) whose
    attention depends on position: q and k drawn large (std 0.3), so that attention is peaked and its
    scores turn with the rotary angles (RoPE off moves the log-probs by 0.7 nats a token); embeddings
    of unit size, so the log-probs spread (std ~1 nat)."""
    model = Llama(LlamaConfig(vocab_size=64, block_size=T, n_layer=1, n_head=2, n_kv_head=1, n_embd=128,
                              intermediate_size=128, rope_theta=1e6, qkv_bias=True, tie_word_embeddings=False,
                              model_type="qwen2"))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.3)
            elif name.endswith(("v_proj.weight", "o_proj.weight")) or name == "unembed.weight":
                p.normal_(0, 0.1)
    return model.eval()


@torch.no_grad()
def next_token_logps(model, ids, dtype="fp32"):
    """log pi(x_t | x_<t), (B, T - 1), in float64 for the comparison; under autocast as a run holds it."""
    with autocast("cpu", dtype):
        return model(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].double()


def test_a_bf16_held_llama_keeps_float32_rope_frequencies_and_the_float32_models_log_probs(tmp_path):
    """Every way a run holds a Llama in bf16 (a frozen reference or reward model, the base of a LoRA
    stage, a folder or an adapter folder loaded in bf16, a plain cast) keeps RoPE's frequencies
    float32, and the log-probs at positions 512-1023 stay within bf16's forward noise of the float32
    model's: 0.012 nats a token on average here (0.011 for a plain cast), bound 0.03; frequencies cast
    to bf16 (the angle off by up to a radian at position 1,000) gave 0.13."""
    torch.manual_seed(0)
    model = position_sensitive_llama()
    ids = torch.randint(0, 64, (2, 1024), generator=torch.Generator().manual_seed(1))
    float32 = next_token_logps(model, ids)
    memory = Memory(LoRAConfig(rank=4, stages="dpo"), dtype="bf16")
    sft, dpo = str(tmp_path / "sft"), str(tmp_path / "dpo")
    save_checkpoint(model, sft)
    with_adapters = memory.trained(load_checkpoint(sft, kind="gpt", dtype=memory.held("dpo"))[0], "dpo")
    save_checkpoint(copy.deepcopy(with_adapters), dpo, base=sft)  # fresh adapters: the base's log-probs
    held = {
        "frozen": memory.frozen(copy.deepcopy(model)),
        "trained with adapters": with_adapters,
        "folder loaded in bf16": load_checkpoint(sft, kind="gpt", dtype=torch.bfloat16)[0],
        "adapter folder loaded in bf16": load_checkpoint(dpo, kind="gpt", dtype=torch.bfloat16)[0],
        ".half().bfloat16()": copy.deepcopy(model).half().bfloat16(),
    }
    rope = rope_frequencies(model.config)
    for name, m in held.items():
        gap = (next_token_logps(m, ids, "bf16") - float32)[:, 511:].abs().mean().item()
        assert gap < 0.03, (name, gap, m.inv_freq.dtype)
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, rope), name
    reward_model = memory.frozen(load_checkpoint(sft, kind="scalar", dtype=torch.bfloat16)[0])
    assert reward_model.gpt.inv_freq.dtype == torch.float32
