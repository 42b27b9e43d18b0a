"""CUDA-only control flow, run on the CPU against stubs of the torch.cuda calls it makes
(cuda_stubs.py): sampling's CUDA graph is captured on the tensors' device, reused by the next call
of the same shapes, reads no float32 weight through a cast at each replay, and a failed capture
leaves the current stream and the allocator as they were; plumbing/runs.py reads the peak memory of the
device the run used. Torch's fake tensors on "cuda:N" take the CUDA path on a CPU build (shapes and
devices, no values); CPU tensors through the emulated graph check the values."""
import json
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sampling
from cuda_stubs import FakeCuda
from llama import Llama, LlamaConfig
from lora import LoRAConfig, adapters, add_adapters
from model import GPT, GPTConfig
from plumbing.runs import Runner
from sampling import generate
from test_sampling import V, left_padded_prompts  # the same vocabulary and prompts as the eager sampler's tests



def llama():
    return Llama(LlamaConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=48, qkv_bias=True, tie_word_embeddings=False))


def adapted_twice(model):
    """model with an earlier stage's adapter held (buffers, lora.Held) under this stage's own, both
    nonzero, every weight float32."""
    add_adapters(model, LoRAConfig(rank=4, targets="attn,mlp"))
    for m in adapters(model):
        torch.nn.init.normal_(m.lora_B, std=0.02)  # as trained
        m.add(4, 8.0)  # the next stage's, on the held one
        torch.nn.init.normal_(m.lora_B, std=0.02)
    return model


LAYOUTS = {"gpt": lambda: GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32)),
           "llama-gqa": llama, "llama-adapted": lambda: adapted_twice(llama())}
CAST = torch.ops.aten._to_copy.default


# fake tensors on "cuda" need a torch built with CUDA (the registry's Linux build, run on the CPU);
# the +cpu wheel refuses them at the first random fill: these tests skip there, saying so
needs_a_cuda_build = pytest.mark.skipif(not torch.backends.cuda.is_built(),
                                        reason="fake tensors on cuda need a torch built with CUDA (not the +cpu wheel)")


def on_fake_cuda(device, layout="gpt", B=4, P=7):
    """A model and a prompt (B, P) as fake tensors on device, made before the stubs (with torch.cuda
    stubbed as available, factories would ask a real CUDA generator for their random numbers)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.device(device):
        model = LAYOUTS[layout]().eval()
        prompts = [torch.randint(1, V, (B, P)) for _ in range(3)]
    return mode, model, prompts


def sample(model, prompt, n=6, dtype=None, device_type="cuda"):
    """Greedy (no random numbers: fake tensors have none), under autocast at dtype if given."""
    with warnings.catch_warnings(), torch.autocast(device_type, dtype, enabled=dtype is not None):
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        return generate(model, prompt, None, n, temperature=0)


@needs_a_cuda_build
def test_the_graph_is_captured_and_replayed_on_the_tensors_device(monkeypatch):
    """With the tensors on cuda:1 and device 0 current (a single process run with --device cuda:1),
    every stream, synchronisation, capture and replay acts on device 1; after sampling, device 0
    is current again and every device's current stream is its default."""
    mode, model, (prompt, *_) = on_fake_cuda("cuda:1")
    cuda = FakeCuda(monkeypatch)
    with mode:
        tokens, _ = sample(model, prompt)
    assert tokens.device == torch.device("cuda:1")
    assert len(cuda.graphs) == 1 and cuda.graphs[0].replays == 4  # 6 tokens: the prefill's, a warm-up step's, 4 replays
    assert {device for call, device in cuda.log} == {1}, cuda.log
    assert cuda.as_before()


@needs_a_cuda_build
def test_a_failed_capture_leaves_the_stream_and_the_allocator_as_they_were(monkeypatch):
    """capture_end fails (as cudaStreamEndCapture can, before the allocator's capture into the
    graph's pool is ended): sampling warns and runs eagerly with the current stream restored, no
    capture underway in the allocator and the pool released; the next call of the same shapes
    does not try again."""
    mode, model, (prompt, *_) = on_fake_cuda("cuda:0")
    cuda = FakeCuda(monkeypatch, fail_capture=True)
    with mode, pytest.warns(UserWarning, match="sampling runs eagerly"):
        tokens, _ = sample(model, prompt)
    assert tokens.shape == (4, 6)
    assert cuda.as_before() and not cuda.underway and len(cuda.released) == 1
    with mode:
        sample(model, prompt)
    assert len(cuda.graphs) == 1


@needs_a_cuda_build
def test_a_second_call_of_the_same_shapes_replays_the_first_calls_graph(monkeypatch):
    """A stage samples the same shapes every iteration: the next call replays the graph the first
    captured, with no synchronisation, no emptied cache and no capture; a prompt of another length
    within the same 64 cache columns too. Another batch size, or a weight moved (not updated in
    place), captures anew."""
    mode, model, prompts = on_fake_cuda("cuda:0")
    cuda = FakeCuda(monkeypatch)
    with mode:
        sample(model, prompts[0])
        first = len(cuda.log)
        sample(model, prompts[1])
        sample(model, prompts[2][:, 1:])  # P = 6
        assert len(cuda.graphs) == 1 and cuda.graphs[0].replays == 4 + 5 + 5
        assert {call for call, _ in cuda.log[first:]} == {"replay"}
        sample(model, prompts[0][:3])
        assert len(cuda.graphs) == 2
        model.transformer.h[0].mlp.c_fc.weight = torch.nn.Parameter(model.transformer.h[0].mlp.c_fc.weight.clone())
        sample(model, prompts[0][:3])
        assert len(cuda.graphs) == 3


@needs_a_cuda_build
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_replay_reads_no_float32_weight_through_a_cast(layout, monkeypatch):
    """Under autocast a graph captured with autocast's cache off would cast every float32 weight of
    a matrix product at every replay: no op of the graph reads a weight through a cast, and every
    product but the vocabulary projection reads bf16 (the copies)."""
    mode, model, (prompt, *_) = on_fake_cuda("cuda:0", layout)
    cuda = FakeCuda(monkeypatch)
    with mode:
        sample(model, prompt, dtype=torch.bfloat16)
    weights = [*model.parameters(), *model.buffers()]
    casts = [args[0] for func, args, _, _ in cuda.graphs[0].ops if func is CAST and any(args[0] is w for w in weights)]
    assert casts == []
    products = [out.dtype for func, *_, out in cuda.graphs[0].ops if func in (torch.ops.aten.mm.default,
                                                                              torch.ops.aten.addmm.default)]
    assert set(products[:-1]) == {torch.bfloat16} and products[-1] == torch.float32  # the vocabulary's: model.py


def two_calls_and_a_step_between(layout, dtype, monkeypatch, graphs):
    """Two generate calls of the same shapes with an in-place update of every weight between them
    (an optimizer step), under CPU autocast at dtype, the decode step eager or through the
    emulated CUDA graph (graphs on the CPU)."""
    monkeypatch.setattr(sampling, "graphs_on", lambda device: graphs)
    torch.manual_seed(0)
    model = LAYOUTS[layout]().eval()
    out = []
    for seed in (1, 2):
        prompt, mask = left_padded_prompts(seed=seed)
        with torch.autocast("cpu", dtype, enabled=dtype is not None):  # as a stage: its cast cache lives one call
            out.append(generate(model, prompt, mask, 12, temperature=0.8, eos_id=5, check_every=4,
                                generator=torch.Generator().manual_seed(seed)))
        with torch.no_grad():
            for w in model.parameters():
                w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, fail", [(None, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16-autocast", "bf16-autocast-capture-fails"])
def test_replays_give_the_eager_steps_tokens_across_calls_and_weight_updates(layout, dtype, fail, monkeypatch):
    """On CPU tensors, the graph replayed from the first call into the second, after the weights
    changed in place, samples the eager step's tokens (the bf16 copies refreshed per call); where
    capture fails, the eager fallback does."""
    eager = two_calls_and_a_step_between(layout, dtype, monkeypatch, graphs=False)
    cuda = FakeCuda(monkeypatch, fail_capture=fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if fail else "error")
        replayed = two_calls_and_a_step_between(layout, dtype, monkeypatch, graphs=True)
    assert len(cuda.graphs) == 1 and (cuda.graphs[0].replays == 0) == fail
    for (tokens, mask), (eager_tokens, eager_mask) in zip(replayed, eager):
        assert torch.equal(tokens, eager_tokens) and torch.equal(mask, eager_mask)


def test_a_stages_peak_memory_is_read_on_the_device_the_run_used(monkeypatch, tmp_path):
    """A single process on --device cuda:1 allocates on device 1 while device 0 stays current: the
    stage's peak_gib is device 1's."""
    peaks = {0: 0, 1: 3 * 2 ** 30}
    index = lambda device: 0 if device is None else torch.device("cuda", device).index
    for name, fake in [("is_initialized", lambda: True), ("device_count", lambda: 2), ("current_device", lambda: 0),
                       ("reset_peak_memory_stats", lambda device=None: None),
                       ("max_memory_allocated", lambda device=None: peaks[index(device)])]:
        monkeypatch.setattr(torch.cuda, name, fake)
    runner = Runner(str(tmp_path), 0, ["tokenizer"], ["tokenizer"], [], None)
    runner.run("tokenizer", "tokenizer", {}, [], lambda folder: {})
    assert json.loads((tmp_path / "tokenizer" / "done.json").read_text())["peak_gib"] == 3.0
