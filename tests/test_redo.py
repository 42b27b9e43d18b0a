"""A stage redone under other settings and killed before each of its writes (an injected kill before
its Nth write of a file, a rename or a removal, for every N; not a timed one) is never half-reused: a
done.json in its folder always comes with the files of the run it names, and the rerun ends with the
files of an uninterrupted run. The stage is DPO, first trained with adapters of rank 8, redone in
full (a full stage) and at rank 2 (a LoRA stage)."""
import builtins
import hashlib
import json
import os
import re
import shutil

import pytest
import torch

from cli import run_train
from plumbing.runs import Runner
from training import StageError

# the smallest pipeline whose DPO stage still saves step states and logs several metrics rows
TINY = ["--preset", "micro", "--n-layer", "1", "--n-embd", "32", "--block-size", "64", "--n-sft", "32",
        "--n-pref", "32", "--sft-steps", "2", "--sft-batch-size", "8", "--rm-epochs", "1", "--rm-batch-size", "8",
        "--easy-fraction", "0.5", "--dpo-batch-size", "4", "--dpo-save-every", "1", "--max-new-tokens", "8",
        "--eval-prompts", "4", "--stages", "tokenizer,sft,rm,split,dpo"]
FIRST = ["--lora-rank", "8", "--lora-stages", "dpo"]
REDO = {"full": [], "lora": ["--lora-rank", "2", "--lora-stages", "dpo"]}
TIMINGS = re.compile(r"^seconds|^finished$")  # what differs from one run to the next
OPEN = builtins.open


class Killed(BaseException):
    """The injected kill: a BaseException, so that nothing on its way out catches it."""


class Writes:
    """Every write into the folder watched (a file opened to write, a rename, a removal) is logged
    as (operation, file name), and the write numbered `kill` (1: the first) raises Killed instead:
    the run dies after every write before it."""

    def __init__(self, monkeypatch):
        self.folder, self.kill, self.log = None, None, []
        seen = lambda op, f, at=0: lambda *a, **k: self.seen(op, a[at]) or f(*a, **k)
        monkeypatch.setattr(builtins, "open", lambda file, mode="r", *a, **k: (
            self.seen("open", file) if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") else None)
            or OPEN(file, mode, *a, **k))
        monkeypatch.setattr(os, "replace", seen("replace", os.replace, 1))
        for name in ("remove", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, seen("remove", getattr(os, name)))

    def seen(self, op, path):
        path = os.path.abspath(os.fspath(path))
        if self.folder and os.path.dirname(path) == self.folder:
            self.log.append((op, re.sub(r"\.tmp\d+$", ".tmp", os.path.basename(path))))
            if len(self.log) == self.kill:
                raise Killed(self.log[-1])

    def watch(self, folder, kill=None):
        self.folder, self.kill, self.log = os.path.abspath(folder), kill, []
        return self


def train(out, flags, writes=None):
    """train.py in this process (tests/cli.py); with writes (Writes.watch), its writes seen, none after."""
    try:
        proc = run_train(*TINY, "--out", out, *flags)
    finally:
        if writes:
            writes.folder = None
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def snapshot(folder):
    """A stage folder's files, each as what it holds: JSON and metrics rows without their timings,
    the sha256 of the rest (weights, step states)."""
    def scrub(value):
        return {k: scrub(v) for k, v in value.items() if not TIMINGS.search(k)} if isinstance(value, dict) else value

    def content(path):
        if path.endswith(".jsonl"):
            return [scrub(json.loads(line)) for line in OPEN(path)]
        if path.endswith(".json"):
            return scrub(json.load(OPEN(path)))
        return hashlib.sha256(OPEN(path, "rb").read()).hexdigest()
    return {name: content(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run faster on one thread, and several dozen runs of them far faster on
    a machine shared with other work (where threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """The first run: DPO with adapters of rank 8."""
    out = tmp_path_factory.mktemp("redo") / "base"
    train(out, FIRST)
    return out


@pytest.mark.parametrize("redo", REDO)
def test_a_redo_killed_at_each_write_is_never_half_reused_and_reruns_to_the_uninterrupted_files(
        redo, base, tmp_path, monkeypatch):
    flags, before = REDO[redo], snapshot(base / "dpo")
    scratch, run = tmp_path / "scratch", tmp_path / "run"
    shutil.copytree(base, scratch, ignore=shutil.ignore_patterns("dpo"))
    train(scratch, flags)  # the redo's settings where DPO never ran: the files to end with
    after = snapshot(scratch / "dpo")
    assert after != before

    def killed_redo(kill):
        shutil.rmtree(run / "dpo")
        shutil.copytree(base / "dpo", run / "dpo")
        with pytest.raises(Killed):
            train(run, flags, writes.watch(run / "dpo", kill))
        return snapshot(run / "dpo")

    writes = Writes(monkeypatch)
    shutil.copytree(base, run)
    train(run, flags, writes.watch(run / "dpo"))  # uninterrupted, its writes logged
    assert snapshot(run / "dpo") == after
    log = writes.log
    assert len(log) >= 15, log  # DPO's 4 steps: 20 writes, few enough to kill the redo before each
    for n in range(1, len(log) + 1):
        left = killed_redo(n)
        where = f"killed before write {n} of {len(log)}, {log[n - 1]}"
        if "done.json" in left:  # complete: every file but a step state is the run's its done.json names
            expected = before if left["done.json"] == before["done.json"] else after
            assert {k: v for k, v in left.items() if k != "step_state.safetensors"} == expected, where
        proc = train(run, flags)
        assert snapshot(run / "dpo") == after, where
        redone = left.get("done.json") != after["done.json"]  # unless the kill came after the redo's done.json
        assert ("== dpo" in proc.stdout) == redone, where

    # the case: killed after the redo's weights, before its done.json, then run with the first
    # settings again: the stage is redone, to the first run's files
    killed_redo(log.index(("open", "done.json.tmp")) + 1)
    proc = train(run, FIRST)
    assert "== dpo" in proc.stdout and snapshot(run / "dpo") == before


def test_a_stage_never_empties_a_folder_the_run_reads(tmp_path):
    """A redo empties its stage's folder: not where it holds a folder the run reads as it is (here
    --reward-model's, given as the dpo folder), which stays untouched, in one line."""
    weights = tmp_path / "dpo" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"the reward model")
    runner = Runner(str(tmp_path), 0, ["rm", "dpo"], ["dpo"])
    runner.outside("rm", str(weights.parent), "0" * 64)
    with pytest.raises(StageError, match=f"stage dpo would empty its folder {weights.parent}, which holds"):
        runner.run("dpo", "dpo", {}, ["rm"], lambda folder: {})
    assert os.listdir(weights.parent) == ["model.safetensors"] and weights.read_bytes() == b"the reward model"
