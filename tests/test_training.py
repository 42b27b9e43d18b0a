"""training.fit's batches: every optimizer step takes exactly batch_size examples, whatever the data
size, so one rule serves one process and N ranks, with or without gradient accumulation; and
FitConfig, the settings it reads, shared by the stages that run it."""
import dataclasses
import json
import os

import pytest

import torch

import data
import training
from plumbing import files, progress
from dpo import DPOConfig
from model import GPT, GPTConfig, response_token_logps, sft_loss
from reward import RMConfig
from sft import SFTConfig
from tolerance import assert_exact
from training import FitConfig, Runtime, batch_plan, epoch_steps, fit


def test_every_batch_is_full_and_every_pass_visits_each_example_once():
    n, size = 37, 8  # 37 does not divide into batches of 8
    steps = epoch_steps(2, n, size)
    assert steps == 9  # floor(2 x 37 / 8): whole batches only
    plan = batch_plan(n, size, steps, torch.Generator().manual_seed(0))
    assert [len(b) for b in plan] == [size] * steps
    stream = [i for b in plan for i in b]
    assert sorted(stream[:n]) == list(range(n))  # the first pass, then the second goes on
    assert len(set(stream[n:2 * n])) == len(stream[n:2 * n])
    assert epoch_steps(3, 5, 8) == 1  # less than a batch of data: one batch, examples repeated


def test_the_stream_of_a_dividing_size_is_the_old_epoch_shuffle():
    """When the batch divides the data, each pass is one shuffle cut in order (as before the rule)."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plan = batch_plan(32, 8, 8, g1)
    old = data.batches(32, 8, g2) + data.batches(32, 8, g2)
    assert plan == old


def fit_once(tmp_path, accum, n=37):
    """SFT-like fit of a tiny GPT on n demonstrations in batches of 8, accum micro-batches each."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=1, n_head=2, n_embd=16)).double()  # exact (tolerance.py)
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(2, 50, (int(torch.randint(1, 6, (), generator=g)),), generator=g).tolist(),
                 torch.randint(2, 50, (int(torch.randint(1, 8, (), generator=g)),), generator=g).tolist() + [1])
                for _ in range(n)]
    cfg = FitConfig(lr=1e-2, weight_decay=0.0, warmup=1, grad_clip=1.0, batch_size=8, save_every=0)
    tokens = lambda batch: batch["response_mask"].sum().item()
    step_loss = lambda f, b: (sft_loss(response_token_logps(f, b), b["response_mask"]), {})
    fit(model, examples, lambda rows: data.collate(*zip(*rows), 0), step_loss, cfg, epoch_steps(2, n, 8),
        str(tmp_path / f"accum-{accum}"), seed=0, units=tokens, runtime=Runtime(grad_accum=accum))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_fit_stage_configs_share_fitconfigs_fields():
    """SFT's, the reward model's and DPO's configs take fit()'s settings from FitConfig, and add their
    own fields; a field declared again for its own default keeps FitConfig's range (plumbing/checks.py reads
    it) and help (SFT's batch size aside: demonstrations, not pairs)."""
    shared = [f.name for f in dataclasses.fields(FitConfig)]
    for cls, own in ((SFTConfig, ["steps"]), (RMConfig, ["epochs"]),
                     (DPOConfig, ["beta", "label_smoothing", "loss_type", "epochs"])):
        assert issubclass(cls, FitConfig) and [f.name for f in dataclasses.fields(cls)] == shared + own
        for f in dataclasses.fields(cls):
            assert f.metadata["help"] and ("range" in f.metadata or "choices" in f.metadata), (cls, f.name)
            if f.name in shared:
                fit_meta = FitConfig.__dataclass_fields__[f.name].metadata
                assert f.metadata["range"] == fit_meta["range"], (cls, f.name)
                assert f.metadata["help"] == fit_meta["help"] or (cls, f.name) == (SFTConfig, "batch_size")
    assert SFTConfig.__dataclass_fields__["batch_size"].metadata["help"] == "demonstrations per step"
    assert (SFTConfig().lr, RMConfig().lr, DPOConfig().lr) == (3e-3, 3e-4, 1e-4)
    assert dataclasses.replace(DPOConfig(), lr=1e-3, beta=0.5) == DPOConfig(beta=0.5, lr=1e-3)


def test_accumulating_one_row_per_micro_batch_gives_the_full_batch_update(tmp_path):
    """8 micro-batches of one row each, on a data size that batches of 8 do not divide: the weights
    of whole-batch steps, up to float order (before the rule, the short last batch stopped it)."""
    assert_exact(fit_once(tmp_path, 8), fit_once(tmp_path, 1))  # in float64: micro-batches sum in other orders


def test_progress_in_a_log_file_is_plain_lines(capsys, monkeypatch):
    """Redirected (stderr not a terminal), progress is a plain line every few seconds and one at the
    end, never tqdm's carriage-return redraws, which made a log of the default run 360 KB."""
    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr(progress.time, "time", lambda: float(next(clock)))
    bar = progress.progress(100, "sft")
    assert isinstance(bar, progress.Lines)
    for step in range(100):
        bar.update()
        bar.set_postfix({"loss": f"{1 / (step + 1):.3f}"})
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 5 <= len(lines) <= 8 and lines[-1].startswith("sft: 100/100 in ")


def test_a_stages_fingerprint_and_seed_do_not_depend_on_its_configs_field_order():
    """The run folder hashes a config as the dict of its fields, keys sorted, not as its repr."""
    from plumbing.runs import plain
    import json
    a, b = SFTConfig(lr=1e-3, steps=5), SFTConfig(steps=5, lr=1e-3)
    assert json.dumps(plain(a), sort_keys=True) == json.dumps({**dataclasses.asdict(a)}, sort_keys=True)
    reordered = dict(reversed(list(dataclasses.asdict(b).items())))
    assert json.dumps({"cfg": a}, sort_keys=True, default=plain) == json.dumps({"cfg": reordered}, sort_keys=True)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    files.truncate_jsonl(str(path), "step", 2)
    assert path.read_text() == '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n'


def test_a_step_state_is_also_saved_by_the_time_since_the_last(tmp_path, monkeypatch):
    """--save-minutes: a step state once that many minutes have passed since the last save, whatever
    the step count, and never at the stage's end (its checkpoint follows)."""
    import time
    from plumbing import checkpoint
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    state = checkpoint.StepState(str(tmp_path), 0, 10, {"model": model}, {"opt": opt}, minutes=1.0)
    state.save(1)
    assert not os.path.exists(state.path)  # a second in: not due
    clock[0] += 61
    state.save(2)
    assert state.restore()[0] == 2
    os.remove(state.path)
    clock[0] += 30
    state.save(3)  # 30 s after the last save
    assert not os.path.exists(state.path)
    clock[0] += 600
    state.save(10)  # the end
    assert not os.path.exists(state.path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_step_still_stops_fit_with_its_step(tmp_path, bad):
    """The guard reads with the figures, every few steps (training.Figures), not at every step: a
    non-finite loss at step 3 still stops the stage naming step 3, after the metrics rows of the
    steps before it, and no step state is saved after it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=1, n_head=2, n_embd=16))
    examples = [([2, 3, 4], [5, 6, 1])] * 16
    calls = []

    def step_loss(forward, batch):
        loss = sft_loss(response_token_logps(forward, batch), batch["response_mask"])
        calls.append(len(calls))
        if len(calls) == 4:  # step 3
            return loss * bad, {}
        return loss, {}
    cfg = FitConfig(lr=1e-2, warmup=1, batch_size=2, save_every=2)
    folder = tmp_path / "sft"
    with pytest.raises(training.NonFiniteError, match=f"step 3: the loss is {bad}"):
        fit(model, examples, lambda rows: data.collate(*zip(*rows), 0), step_loss, cfg, 8, str(folder), seed=0)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    from plumbing import checkpoint
    state = checkpoint.StepState(str(folder), 2, 8, {"model": model}, {})
    assert state.restore()[0] == 2  # the state of step 2, saved after a read that found it finite


def test_the_runtime_settings_leave_a_complete_stage_as_it_is(tmp_path):
    """--compile, --grad-accum and --save-minutes say how a stage runs, not what it learns
    (training.Runtime): in no stage's fingerprint, so a complete stage is reused under them."""
    from cli import run_train
    flags = ["--preset", "micro", "--stages", "tokenizer,sft", "--sft-steps", "2", "--out", str(tmp_path)]
    assert run_train(*flags).returncode == 0
    done = (tmp_path / "sft" / "done.json").read_text()
    again = run_train(*flags, "--compile", "--grad-accum", "2", "--save-minutes", "5")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "sft" / "done.json").read_text() == done
