"""Reproducible runs, resuming after a kill, and the non-finite guard, on the micro preset."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import training
from cli import run_train
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_FOLDERS = ["sft", "rm", "dpo", "ppo"]
# step states every few steps, so that a kill lands between two of them; SFT, the reward model and the
# evaluation shorter than the preset's, as a resume is exact at any length (the runs here cost half)
FLAGS = ["--preset", "micro", "--sft-steps", "60", "--sft-save-every", "20", "--rm-epochs", "1", "--ppo-save-every", "1",
         "--ppo-iterations", "12", "--eval-prompts", "16"]


def command(out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *FLAGS, "--out", str(out), *extra]


def run(out, *extra):
    proc = subprocess.run(command(out, *extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def results_without_timings(out):
    r = json.loads((out / "results.json").read_text())
    r.pop("seconds"), r.pop("reused")
    for row in r["methods"].values():
        row.pop("seconds")
    return r


def kill_when(out, path, timeout=300):
    """Start the pipeline, SIGKILL it as soon as `path` (a step state) appears."""
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before a step state was saved"
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The run never killed, in this process (tests/cli.py); the runs killed and resumed below are processes."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_train(*FLAGS, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_same_seed_same_results_and_weights(reference_run, tmp_path):
    """The same run again, in a process of its own, gives the same bytes."""
    again = tmp_path / "run"
    run(again)
    assert results_without_timings(again) == results_without_timings(reference_run)
    for stage in STAGE_FOLDERS:
        assert (again / stage / "model.safetensors").read_bytes() == (reference_run / stage / "model.safetensors").read_bytes()


def test_killed_twice_then_resumed_matches_an_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "run"
    kill_when(out, out / "sft" / "step_state.safetensors")  # killed inside SFT
    assert not (out / "sft" / "done.json").exists()
    kill_when(out, out / "ppo" / "step_state.safetensors")  # resumed SFT, then killed inside PPO
    assert (out / "sft" / "done.json").exists() and not (out / "ppo" / "done.json").exists()
    proc = run_train(*FLAGS, "--out", out)  # the same command again, in this process (tests/cli.py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step" in proc.stdout + proc.stderr
    assert results_without_timings(out) == results_without_timings(reference_run)
    for stage in STAGE_FOLDERS:
        assert (out / stage / "model.safetensors").read_bytes() == (reference_run / stage / "model.safetensors").read_bytes()
        assert not (out / stage / "step_state.safetensors").exists()  # removed once the stage is complete


def test_non_finite_loss_stops_the_stage_and_keeps_the_last_state(tmp_path):
    out = tmp_path / "run"
    proc = run_train(*FLAGS, "--out", out, "--sft-lr", "1e4", "--sft-save-every", "1")  # in this process (tests/cli.py)
    assert proc.returncode == 3
    assert "error: stage sft, step 1: the gradient norm is nan (learning rate too high?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    state = load_file(out / "sft" / "step_state.safetensors")
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())
    assert not (out / "sft" / "done.json").exists()
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and math.isfinite(rows[0]["loss"])


def test_weights_are_only_loaded_through_safetensors():
    """No pickle anywhere in the project: torch.load and pickle can run code hidden in a file."""
    sources = [os.path.relpath(os.path.join(d, f), ROOT) for folder in ("", "plumbing", "bench", "publish")
               for d in [os.path.join(ROOT, folder)] for f in os.listdir(d) if f.endswith(".py")]
    assert "plumbing/checkpoint.py" in sources
    for name in sources:
        text = open(os.path.join(ROOT, name)).read()
        assert "torch.load(" not in text and "import pickle" not in text, name


class Killed(Exception):
    pass


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="fp16 on the CPU needs torch.amp.GradScaler (torch >= 2.3)")
def test_fp16_resumes_with_the_loss_scale_it_was_killed_with(tmp_path, monkeypatch):
    """The step state keeps the GradScaler's state: a run killed after its loss scale backed off
    resumes with that scale (a fresh 2**16 would skip the next steps again) and ends bit for bit
    where an uninterrupted run ends."""
    scalers = []
    make_scaler = training.grad_scaler
    monkeypatch.setattr(training, "grad_scaler", lambda *a: scalers.append(make_scaler(*a)) or scalers[-1])
    torch.manual_seed(0)
    examples = [torch.randint(0, 97, (32,)) for _ in range(16)]
    cfg = types.SimpleNamespace(lr=1e-3, weight_decay=0.0, warmup=1, grad_clip=1.0, batch_size=4, save_every=2)

    def train(folder, kill_at=None):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32))
        calls = itertools.count()

        def step_loss(forward, batch):
            if next(calls) == kill_at:
                raise Killed  # as a SIGKILL would, after the step state of step 2
            logits = forward(batch["ids"])
            # 16 x the mean: large enough that steps 0 and 1 overflow fp16 at the first scale, 2**16
            return 16 * F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["ids"][:, 1:].flatten()), {}
        training.fit(model, examples, lambda ex: {"ids": torch.stack(ex)}, step_loss, cfg, 5, str(folder), seed=0,
                     dtype="fp16")
        return model.state_dict()

    reference = train(tmp_path / "ref")
    assert scalers[0].get_scale() < 2.0 ** 16  # the premise: the scale backed off before the kill
    with pytest.raises(Killed):
        train(tmp_path / "run", kill_at=3)
    resumed = train(tmp_path / "run")
    assert max((resumed[k] - v).abs().max().item() for k, v in reference.items()) == 0.0
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()


def test_a_stage_on_a_gpu_records_its_peak_memory(tmp_path, monkeypatch):
    """done.json's peak_gib: the allocator's peak over the stage, when CUDA is in use (faked here:
    the CPU has none), and nothing when it is not."""
    import torch
    from plumbing.runs import Runner
    runner = Runner(str(tmp_path), 0, ["tokenizer"], ["tokenizer"], [], None)
    runner.run("tokenizer", "tokenizer", {}, [], lambda folder: {})
    assert "peak_gib" not in json.loads((tmp_path / "tokenizer" / "done.json").read_text())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2 ** 29)
    runner = Runner(str(tmp_path), 0, ["tokenizer"], ["tokenizer"], ["tokenizer"], None)
    runner.run("tokenizer", "tokenizer", {}, [], lambda folder: {})
    assert json.loads((tmp_path / "tokenizer" / "done.json").read_text())["peak_gib"] == 1.5
