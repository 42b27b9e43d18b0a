"""Data parallel under torchrun (2 CPU processes, gloo) against one process, and --grad-accum.

Tolerances, measured on the micro preset: a stage run on 2 ranks and the same stage run in one
process from the same inputs give per-step losses within 1e-6 and weights within about 1e-5
(floating-point order only), except parameters whose loss is invariant to them (the reward
model's biases along its head: Bradley-Terry sees only differences), where Adam turns
rounding-level gradients into lr-sized steps; for the reward model we compare what it computes
(the losses and the split's gaps). PPO and the evaluation sample per rank, so they are compared
in distribution only, not here.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import train
from tolerance import EXACT, assert_exact, network_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_WIDEST = 4 * 64  # the micro preset's longest sum: its MLP's 4 n_embd (tolerance.network_atol)
# step states every 10 SFT steps, so that a kill lands between two of them; short stages, as a stage
# on two ranks is compared with one process, not with how well it trains
ARGS = ["--preset", "micro", "--sft-steps", "30", "--sft-save-every", "10", "--rm-epochs", "1", "--ppo-iterations", "2",
        "--eval-prompts", "12", "--eval-samples", "1"]


def losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return torch.tensor([json.loads(line)["loss"] for line in f])


def max_diff(a, b):
    a, b = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def single_stage(tmp_path, two, stage, upstream):
    """`stage` in one process, from the 2-rank run's upstream stages (copied with their done.json)."""
    one = tmp_path / f"one-{stage}"
    for name in upstream:
        shutil.copytree(two / name, one / name)
    train.main(ARGS + ["--out", str(one), "--stages", stage])
    return one


def torchrun(out, *extra):
    """train.py on 2 CPU ranks (gloo), through the watching entry point; returns the Popen."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "tests", "ddp_worker.py"), *ARGS, "--out", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(out)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return out


def test_only_rank_0_writes(two):
    written = {r: json.load(open(two.parent / f"written-by-rank-{r}.json")) for r in (0, 1)}
    assert written[1] == []
    assert any("ppo/model.safetensors" in w for w in written[0])  # the watch sees rank 0's writes
    results = json.load(open(two / "results.json"))
    assert results["config"]["world_size"] == 2
    assert set(results["methods"]) == {"sft", "mpo_stage1", "mpo"}


def test_two_ranks_train_as_one_process(two, tmp_path):
    # float32 runs (each stage loads its upstream in float32): a loss from magnitudes (tolerance.py),
    # the weights within the measured 1e-5 and a tenfold margin (Adam's steps have no closed bound)
    close = lambda a, b: torch.allclose(a, b, rtol=0, atol=network_atol(a, MICRO_WIDEST, 2))
    one = single_stage(tmp_path, two, "sft", ["tokenizer"])
    assert close(losses(two / "sft"), losses(one / "sft"))
    assert max_diff(two / "sft", one / "sft") < 1e-4

    one = single_stage(tmp_path, two, "rm", ["tokenizer", "sft"])
    assert close(losses(two / "rm"), losses(one / "rm"))

    one = single_stage(tmp_path, two, "split,dpo", ["tokenizer", "sft", "rm"])
    gaps = [torch.tensor(json.load(open(d / "split" / "gaps.json"))) for d in (two, one)]
    assert torch.allclose(*gaps, rtol=0, atol=2 * network_atol(gaps[0], MICRO_WIDEST, 2))  # scored in shards: two scores' errors
    assert json.load(open(two / "split" / "easy.json")) == json.load(open(one / "split" / "easy.json"))
    assert close(losses(two / "dpo"), losses(one / "dpo"))
    assert max_diff(two / "dpo", one / "dpo") < 1e-4


def test_a_killed_rank_resumes(two, tmp_path):
    """SIGKILL rank 1 once SFT has saved a step state; the same command again resumes from it
    and ends with the weights of the run that was never killed."""
    out = tmp_path / "run"
    proc = torchrun(out, "--stages", "tokenizer,sft")
    state, t0 = out / "sft" / "step_state.safetensors", time.time()
    while not state.exists():
        assert proc.poll() is None and time.time() - t0 < 300, "SFT ended before a step state was saved"
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid-rank-1").read_text()), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (out / "sft" / "done.json").exists()
    proc = torchrun(out, "--stages", "tokenizer,sft")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert max_diff(out / "sft", two / "sft") == 0.0


def test_grad_accum_gives_the_full_batch_update(tmp_path):
    """SFT weighs each micro-batch by its share of the batch's response tokens: the same update,
    exactly in float64 (tolerance.py; the model is made in the default dtype), where float32's
    rounding of the micro-batches' sums in another order would be turned by Adam into steps."""
    runs = {}
    for accum in (1, 2):
        out = tmp_path / f"accum-{accum}"
        torch.set_default_dtype(torch.float64)
        try:
            train.main(["--preset", "micro", "--sft-steps", "10", "--stages", "tokenizer,sft", "--out", str(out),
                        "--grad-accum", str(accum)])
        finally:
            torch.set_default_dtype(torch.float32)
        runs[accum] = out / "sft"
    assert torch.allclose(losses(runs[1]), losses(runs[2]), rtol=EXACT, atol=0)
    weights = [load_file(os.path.join(r, "model.safetensors")) for r in (runs[1], runs[2])]
    for k in weights[0]:
        assert_exact(weights[1][k], weights[0][k])


def test_batches_that_cannot_be_split_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it: 16 rollouts do not split over 3 ranks
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--preset", "micro"])
    assert e.value.code == 2 and "--ppo-rollouts 16 must split evenly over the 3 ranks" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        train.parse_args(["--grad-accum", "0"])
    # the micro preset's SFT batch is 16 demonstrations: not 32 micro-batches, found before any work
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "micro", "--stages", "tokenizer,sft", "--grad-accum", "32", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith("error: --sft-batch-size 16 is smaller than 1 ranks x --grad-accum 32: "
                                                  "each micro-batch needs a row")
    assert not (tmp_path / "run").exists()
