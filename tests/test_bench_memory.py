"""bench/memory.py: the peak memory measured on fake tensors is the one real tensors reach, by
PeakMemory's own count and by torch's CPU allocator (torch.profiler), at a tiny shape, every
stage and setting; the table by hand."""
import os
import subprocess
import sys

import pytest
import torch

from bench import memory as bench_memory
from llama import LlamaConfig
from model import GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"gpt": GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32),
          "llama": LlamaConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                               intermediate_size=48, tie_word_embeddings=False)}


@pytest.fixture
def tiny(monkeypatch):
    for k, v in dict(prompt=12, response=8, rows=4, pairs=4, rollouts=8, epochs=2, minibatches=2).items():
        monkeypatch.setattr(bench_memory.Sizes, k, v)


CASES = [("gpt", "full fp32", stage) for stage in bench_memory.STAGES] + [
    ("llama", "LoRA bf16 + ckpt", "dpo"), ("llama", "LoRA bf16 + ckpt", "ppo"), ("llama", "full bf16", "rm")]


@pytest.mark.parametrize("layout, setting, stage", CASES, ids=["-".join(c) for c in CASES])
def test_fake_tensors_reach_the_peak_real_ones_do(tiny, tmp_path, layout, setting, stage):
    fake = bench_memory.measure(SHAPES[layout], setting, stage, str(tmp_path))
    real = bench_memory.measure(SHAPES[layout], setting, stage, str(tmp_path), fake=False)
    assert fake == pytest.approx(real, rel=1e-6) and fake > 0


def test_the_allocator_agrees_and_adapters_hold_less(tiny, tmp_path, monkeypatch):
    """torch.profiler's count of the CPU allocator's bytes peaks where PeakMemory's does (1%); the
    same DPO step with adapters and checkpointing holds less than with full fine-tuning."""
    monkeypatch.setattr(bench_memory, "check_shape", lambda: SHAPES["gpt"])
    counted = bench_memory.measure(SHAPES["gpt"], "full fp32", "dpo", str(tmp_path), fake=False)
    assert bench_memory.allocated_peak("full fp32", "dpo", str(tmp_path)) == pytest.approx(counted, rel=0.01)
    assert bench_memory.measure(SHAPES["gpt"], "LoRA bf16 + ckpt", "dpo", str(tmp_path)) < counted


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the resident memory is read from Linux's /proc")
def test_the_resident_growth_process_runs_the_step_it_names(monkeypatch, capsys):
    """resident_growth's process is code in a string, which no import checks: it is run here, in this
    process, against stand-ins of the step (a real one costs seconds), from the package it names."""
    argv = []
    monkeypatch.setattr(bench_memory.subprocess, "run",
                        lambda a, **kw: argv.extend(a) or subprocess.CompletedProcess(a, 0, "0.5\n", ""))
    assert bench_memory.resident_growth("full fp32", "dpo", "F") == 0.5
    assert argv[:2] == [sys.executable, "-c"]
    calls, rss = [], {"VmRSS": 2 ** 30, "VmHWM": 3 * 2 ** 30}
    monkeypatch.setattr(bench_memory, "warm_up", lambda folder: calls.append(folder))
    monkeypatch.setattr(bench_memory, "measure", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(bench_memory, "rss", rss.get)
    exec(argv[2], {})
    assert calls == ["F", ((bench_memory.check_shape(), "full fp32", "dpo", "F"), {"fake": False})]
    assert capsys.readouterr().out == "2.0\n"


def test_the_table_by_hand():
    done = {"measured": {"m | full fp32 | sft": 30.0, "m | full fp32 | ppo": 10.0, "m | LoRA bf16 | sft": 20.0},
            "check": [("sft", 1.0, 1.0, 1.001, 1.2)]}
    done["measured"].update({"m | full fp32 | rm": 5.0, "m | full fp32 | dpo": 5.0})
    text = bench_memory.report(done)
    assert "| m | full fp32 | 30.0 | 5.0 | 5.0 | 10.0 | 40 GB |" in text  # 30 x 1.2 = 36
    assert "| m | LoRA bf16 | 20.0 | not yet | not yet | not yet | (a stage not measured) |" in text  # 24.0
    assert "| sft | 1.000 | 1.000 | 1.001 | 1.200 |" in text


def test_the_readme_one_gpu_commands_run_at_the_measured_sizes():
    """README.md's one-GPU figures are bench_memory's rows (ONE_GPU): --preset gpu24 is the
    "LoRA bf16 + ckpt" setting at bench_memory.Sizes, and the full fine-tune's flags on the gpt2
    preset give the "full bf16 + ckpt" setting at the same sizes (PPO's peak is one minibatch's)."""
    import train
    S = bench_memory.Sizes
    sizes = lambda p, minibatches: (p.sft.batch_size, p.rm.batch_size, p.dpo.batch_size, p.ppo.rollouts, minibatches,
                                    p.ppo.micro_batch, p.max_new_tokens, p.grad_accum)
    measured = (S.rows, S.pairs, S.pairs, S.rollouts, S.minibatches, S.micro_batch, S.response, S.grad_accum)
    gpu24, gpt2 = train.PRESETS["gpu24"], train.PRESETS["gpt2"]
    assert sizes(gpu24, gpu24.ppo.minibatches) == measured and gpu24.ppo.epochs == S.epochs
    assert sizes(gpt2, 4) == measured  # README: --ppo-minibatches 4
    lora = bench_memory.memory_of(bench_memory.ONE_GPU["gpu24"][1])
    assert (gpu24.lora, gpu24.dtype, gpu24.checkpointing) == (lora.lora, lora.dtype, lora.checkpointing)
    full = bench_memory.memory_of(bench_memory.ONE_GPU["full"][1])
    assert (gpt2.lora.rank, full.lora.rank, full.dtype, full.checkpointing) == (0, 0, "bf16", True)
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert "--preset gpt2 --init Qwen2.5-0.5B/ --dtype bf16 --checkpointing --ppo-minibatches 4" in readme
    assert {model for model, _ in bench_memory.ONE_GPU.values()} <= set(bench_memory.shapes())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("setting", ["full fp32", "LoRA bf16 + ckpt"])
def test_on_cuda_the_allocator_reaches_what_the_fake_tensors_counted(tmp_path, setting):
    """--device cuda: the caching allocator's peak over each step at the check shape, against the
    fake count: no more than the table's margin above it (workspaces, rounding to the allocator's
    blocks), and not far below (a fused attention kernel may hold less than the CPU's path)."""
    for stage in bench_memory.STAGES:
        fake = bench_memory.measure(bench_memory.check_shape(), setting, stage, str(tmp_path))
        cuda = bench_memory.measure(bench_memory.check_shape(), setting, stage, str(tmp_path), device="cuda")
        assert fake / 2 <= cuda <= fake * bench_memory.MARGIN, (stage, fake, cuda)
