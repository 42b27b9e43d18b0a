"""Run folders: the Runner that runs each stage into its folder, reuses a complete one whose
settings and inputs have not changed, and resumes a killed one from its step state; and the lock
that keeps a second run out of a folder in use; and what a run's results.json records of its
settings and of each method's costs."""
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time

import torch
from tqdm import tqdm

from plumbing import distributed
from plumbing.files import write_text
from training import NonFiniteError, StageError, epoch_steps
from plumbing import files


class Stop(Exception):
    """Raised by Runner.run for a stage after the last one asked for: the pipeline ends there."""


def plain(value):
    """A stage config as the dict of its fields (their order does not matter: keys are sorted);
    anything else JSON cannot hold as its str."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


class Runner:
    """Runs stages into a run folder; reuses a stage whose done.json has the same fingerprint.

    order: every stage kind in pipeline order; stages: the kinds asked for. A stage of a kind
    after the last one asked for raises Stop; one before it that is not asked for must be
    complete already.
    """

    def __init__(self, out, seed, order, stages, force=(), shared=None):
        self.out, self.seed, self.force, self.shared = out, seed, set(force), shared or {}
        self.order, self.stages = order, set(stages)
        self.last = max(order.index(s) for s in stages)
        self.done, self.reused, self.seconds = {}, [], {}
        self.elsewhere = {}  # stage name: a folder made outside the run (outside)

    def path(self, name):
        if name in self.elsewhere:
            return self.elsewhere[name]
        return os.path.join(self.shared.get(name, self.out), name)

    def outside(self, name, folder, sha256):
        """A stage that is not run: its folder was made outside the run (--reward-model's). The stages
        that read it fingerprint its content hash, sha256, in the place of when it finished."""
        self.elsewhere[name] = folder
        self.done[name] = {"finished": sha256, "summary": {"folder": folder, "sha256": sha256}}

    def run(self, name, kind, settings, upstream, fn):
        """Reuse the stage if complete with this fingerprint; else run fn(folder), resuming from
        its step state when one was saved under the same fingerprint. Returns its summary."""
        if self.order.index(kind) > self.last:
            raise Stop(name)
        if name in self.done:  # shared by two methods of this run
            return self.done[name]["summary"]
        folder = self.path(name)
        done_path = os.path.join(folder, "done.json")
        # a stage's fingerprint: its settings and when each of its inputs last finished
        key = json.dumps({"settings": settings, "upstream": [self.done[u]["finished"] for u in upstream]},
                         sort_keys=True, default=plain)
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        if name in self.shared:  # made by the main run of the same command (a sweep's): used as it is
            if not os.path.exists(done_path):
                raise StageError(f"stage {name} is shared with {self.shared[name]} but not complete there")
            self.done[name] = done = files.read_json(done_path)
            self.seconds[name] = done["seconds"]
            self.reused.append(name)
            return done["summary"]
        if os.path.exists(done_path) and name not in self.force:
            done = files.read_json(done_path)
            if done["fingerprint"] == fingerprint:
                if distributed.is_main():  # left by a kill after done.json, before its removal below
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, "step_state.safetensors"))
                self.done[name], self.seconds[name] = done, done["seconds"]
                self.reused.append(name)
                return done["summary"]
        if kind not in self.stages:
            raise StageError(f"stage {name} is needed but not complete in {folder}; add {kind} to --stages")
        distributed.barrier()  # every rank has read done.json before rank 0 takes it away (start)
        step_state = self.start(name, folder, fingerprint)
        distributed.barrier()  # rank 0 has made the folder ready before any rank looks
        # the stage's seed: its name, settings and the run's seed, never the upstream timestamps
        seed_key = json.dumps({"name": name, "settings": settings, "seed": self.seed}, sort_keys=True, default=plain)
        torch.manual_seed(int(hashlib.sha256(seed_key.encode()).hexdigest()[:8], 16))
        t0 = time.time()
        tqdm.write(f"== {name} -> {folder}")
        if torch.cuda.is_initialized():  # each device: a process on --device cuda:1 allocates on 1, not on the current 0
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
        try:
            summary = fn(folder)
        except NonFiniteError as e:
            kept = f"; the last step state is kept: {step_state}" if os.path.exists(step_state) else ""
            raise NonFiniteError(f"stage {name}, {e}{kept}") from None
        # on a GPU, the stage's peak of the caching allocator (this rank's): what it needs of the card
        peak = ({"peak_gib": round(max(map(torch.cuda.max_memory_allocated, range(torch.cuda.device_count()))) / 2 ** 30, 3)}
                if torch.cuda.is_initialized() else {})
        done = distributed.broadcast({"fingerprint": fingerprint, "seconds": round(time.time() - t0, 2), **peak,
                                      "summary": summary, "finished": time.time()})  # one time: one fingerprint
        files.write_json(done_path, done)  # written last: the stage is complete
        if os.path.exists(step_state) and distributed.is_main():
            os.remove(step_state)
        distributed.barrier()  # the stage's files are written before any rank reads them
        self.done[name], self.seconds[name] = done, done["seconds"]
        return summary

    def start(self, name, folder, fingerprint):
        """Make the stage's folder ready to run into; returns its step state's path.

        Every file in a stage folder but started.json was written by a run of the fingerprint that
        started.json names, since a fresh start empties the folder before it writes started.json. So
        a stage killed under this fingerprint resumes from what it left (its step state, its
        metrics; less the temporary files of the writes cut short). Any other start (other settings
        or inputs, --force, a complete stage redone) takes away done.json first, so that the stage
        is incomplete before anything in its folder changes, then started.json, so that no resume
        can start from a half-emptied folder, then everything else. Rank 0 alone changes it (it writes)."""
        self.check_not_read(name, folder)  # on every rank: all stop, not rank 0 alone
        step_state = os.path.join(folder, "step_state.safetensors")
        if not distributed.is_main():
            return step_state
        os.makedirs(folder, exist_ok=True)
        done, started = os.path.join(folder, "done.json"), os.path.join(folder, "started.json")
        if (name not in self.force and not os.path.exists(done) and os.path.exists(started)
                and files.read_json(started)["fingerprint"] == fingerprint):
            for entry in os.scandir(folder):
                if files.temporary(entry.name):
                    os.remove(entry.path)
            return step_state
        for path in (done, started):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        for entry in os.scandir(folder):
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry.path)
        files.write_json(started, {"fingerprint": fingerprint})
        return step_state

    def check_not_read(self, name, folder):
        """A StageError if the stage's folder is, or holds, a folder this run reads as it is (a shared
        stage, --reward-model's): emptying it would delete what the run stands on."""
        mine = os.path.realpath(folder)
        for other in [*self.elsewhere.values(), *(self.path(n) for n in self.shared)]:
            if os.path.commonpath([mine, os.path.realpath(other)]) == mine:
                raise StageError(f"stage {name} would empty its folder {folder}, which holds {other}, a folder "
                                 "this run reads; move it, or choose another --out")


@contextlib.contextmanager
def locked(folder):
    """Hold folder/lock while a run writes there: a second run stops at once with a StageError;
    a lock whose process has died (a crash, a kill) is taken over. Rank 0 holds it for all."""
    if not distributed.is_main():
        yield
        return
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    path, tmp = os.path.join(folder, "lock"), os.path.join(folder, f"lock.tmp{os.getpid()}")
    write_text(tmp, str(os.getpid()))
    try:
        while True:
            try:
                os.link(tmp, path)  # atomic: the lock appears with its pid already in it
                break
            except FileExistsError:
                try:
                    pid = int(open(path).read())
                except FileNotFoundError:
                    continue  # released in the meantime
                except ValueError:
                    pid = 0  # not a lock of ours: take it over
                if pid and pid != os.getpid() and _alive(pid):
                    raise StageError(f"{folder} is in use by another run (process {pid}); wait for it to "
                                     f"finish, or choose another --out (or delete {path} if that is not a run)") from None
                # left behind by a run that died (two runs taking over the same stale lock at the
                # same instant could both pass; we accept that race for a lock file this simple)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    finally:
        os.remove(tmp)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        if created and not os.listdir(folder):
            os.rmdir(folder)  # a run that stopped before writing anything leaves nothing behind


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True



# ----------------------------------------------------------------------------- what a run records

def method_costs(stages, plan, runner):
    """What each method ({method: its stages, mpo.method_stages}) needs from SFT on: the DPO pairs it trains on (steps x batch size), the PPO
    rollouts it samples (iterations x rollouts) and the seconds of its own stages and of the shared
    stages it needs (the reward model, a split), less the held-out gold probes, which are evaluation."""
    plan = {name: (kind, subset, cfg) for name, kind, _, _, subset, cfg in plan}
    costs = {}
    for method, steps in stages.items():
        needs, pairs, rollouts = set(), 0, 0
        for name, kind, recipe in steps:
            _, subset, cfg = plan[name]
            needs.add(name)
            if recipe["subset"] != "all":  # the split it reads, and what that split needs
                needs |= {"rm", recipe["split"]} | ({"split"} if recipe["split"] == "split_gold" else set())
            if kind == "ppo":  # the reward model scores its rollouts
                needs.add("rm")
                rollouts += cfg.iterations * cfg.rollouts
            else:
                pairs += epoch_steps(cfg.epochs, len(subset), cfg.batch_size) * cfg.batch_size
        seconds = sum(runner.seconds.get(s, 0) - probe_seconds(runner.path(s)) for s in needs)
        costs[method] = {"seconds": round(seconds, 2), "dpo_pairs": pairs, "ppo_rollouts": rollouts}
    return costs


def probe_seconds(folder):
    """The seconds a stage spent on held-out gold probes (DPO) or on judging its rollouts' gold (PPO)."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        return sum(row.get("seconds_probe", 0) + row.get("seconds_gold", 0) for row in map(json.loads, f))


def run_record(run, seed, tau, cfgs, eval_prompts):
    """The settings a results.json records."""
    return {"preset": run.preset, "seed": seed, "label_noise": tau, "annotator_bias": run.annotator_bias,
            **({"label_flips": run.label_flips} if run.label_flips else {}),
            "bias_kind": run.bias_kind, "max_new_tokens": run.max_new_tokens, "eval_prompts": eval_prompts,
            "eval_temperature": run.eval_temperature,
            "eval_samples": run.eval_samples, "eval_split": run.eval_split, "on_policy_pairs": run.on_policy_pairs,
            "world_size": distributed.world_size(), "grad_accum": run.grad_accum,
            **({"judge_fraction": run.judge_fraction} if run.data else {}),
            **{k: dataclasses.asdict(v) for k, v in cfgs.items()}}
