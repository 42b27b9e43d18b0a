"""Real data's judge: a second reward model trained on a held-out part of --data that no other stage
sees (data.load_task, stages.judge_stage), judging the evaluation in the place of the built-in task's
gold reward."""
import json
import os
import shutil
import statistics

import pytest

from cli import run_process, run_train
import data
import mpo
import stages
import train
from evaluate import win_tie_loss
from task import make_task
from plumbing.tokenizer import Tokenizer
from tolerance import network_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_FILE = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
# the preset's SFT and reward models shortened: what each stage is given is the point here, not how well it trains
MICRO = ["--preset", "micro", "--easy-fraction", "0.5", "--eval-samples", "2", "--sft-steps", "60", "--rm-epochs", "1"]


def read(path):
    with open(path) as f:
        return json.load(f)


def pairs_file(path, n=300):
    """n preference pairs of the built-in task as a jsonl file, each prompt made unique by its line
    number, so that prompts tell the pairs apart too."""
    rows = make_task(0, n_sft=0, n_pref=n)["pref"]
    with open(path, "w") as f:
        for i, r in enumerate(rows, 1):
            prompt = r["prompt"].replace("Human: ", f"Human: (#{i}) ", 1)
            f.write(json.dumps({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A micro --data run, in this process, recording what each training stage was given."""
    base = tmp_path_factory.mktemp("judge")
    path, out = pairs_file(base / "pairs.jsonl"), base / "run"
    seen = {"sft": [], "rm": {}, "split": [], "dpo": [], "ppo": []}

    def record(name, fn, position, key=None):
        def wrapped(*args, **kw):
            value = args[position]
            if key is None:
                seen[name].append(value)
            else:
                seen[name][os.path.basename(args[key])] = value
            return fn(*args, **kw)
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "train_sft", record("sft", stages.train_sft, 2))
        mp.setattr(stages, "train_reward_model", record("rm", stages.train_reward_model, 2, key=6))  # by its folder
        mp.setattr(mpo, "split_stage", record("split", mpo.split_stage, 1))
        mp.setattr(mpo, "train_dpo", record("dpo", mpo.train_dpo, 3))
        mp.setattr(mpo, "train_ppo", record("ppo", mpo.train_ppo, 5))
        train.main([*MICRO, "--data", path, "--out", str(out), "--compare"])
    task = data.load_task(0, 1.0, lambda m: None, data=path, eval_prompts=48)  # the run's task, again
    return out, path, task, seen


def lines(records):
    return {r["line"] for r in records}


def test_the_judge_trains_on_pairs_no_other_stage_sees(run):
    out, _, task, seen = run
    judge = lines(task["judge"])
    assert read(out / "judge" / "pairs.json") == sorted(judge) == [r["line"] for r in seen["rm"]["judge"]]
    # a seeded fifth of the 270 pairs left after the held-out tenth; the three parts cover the file
    assert len(judge) == round(0.2 * 270) == read(out / "judge" / "done.json")["summary"]["pairs"]
    assert judge | lines(task["pref"]) | lines(task["held_out"]) == set(range(1, 301))
    assert not judge & lines(task["pref"]) and not judge & lines(task["held_out"])
    # the training reward model and the split see the training pairs, every DPO stage some of them
    assert [r["line"] for r in seen["rm"]["rm"]] == [r["line"] for r in task["pref"]]
    assert all(lines(records) == lines(task["pref"]) for records in seen["split"])
    assert len(seen["dpo"]) == 2 and all(lines(records) <= lines(task["pref"]) for records in seen["dpo"])
    assert read(out / "dpo_all" / "done.json")["summary"]["pairs"] == len(task["pref"])
    # SFT's demonstrations (the chosen side) and PPO's prompts: none of the judge's (prompts are unique)
    judge_prompts = {r["prompt"] for r in task["judge"]}
    (demos,) = seen["sft"]
    assert demos == [(r["prompt"], r["chosen"]) for r in task["pref"]]
    assert len(seen["ppo"]) == 3 and not judge_prompts & {p for prompts in seen["ppo"] for p in prompts}
    assert len(read(out / "split" / "gaps.json")) == len(task["pref"])


def test_the_evaluation_judges_with_the_judge(run):
    out, _, task, _ = run
    results = read(out / "results.json")
    assert results["win_rate_judge"].startswith(f"the judge, a reward model trained on {len(task['judge'])} "
                                                "held-out pairs that no policy or training RM saw")
    assert results["judge"]["pairs"] == len(task["judge"]) and results["config"]["judge_fraction"] == 0.2
    assert "judge" in results["seconds"] and "gold_reward" not in results["methods"]["sft"]
    judged = read(out / "eval" / "judged.json")
    sft = judged["sft"]["judge_score"]
    for m, row in results["methods"].items():
        scores = judged[m]["judge_score"]
        assert row["judge_score"] == pytest.approx(statistics.fmean(scores))
        assert row["rm_score"] == pytest.approx(statistics.fmean(judged[m]["rm_score"]))
        win, tie, loss = win_tie_loss(scores, sft)
        assert (row["win_vs_sft"], row["tie_vs_sft"], row["loss_vs_sft"]) == pytest.approx((win, tie, loss))
        assert "win_vs_chosen" in row
    assert judged["mpo"]["judge_score"] != judged["mpo"]["rm_score"]  # two reward models, two opinions
    diffs = [a - b for a, b in zip(judged["mpo"]["judge_score"], judged["dpo"]["judge_score"])]
    assert results["vs_mpo"]["dpo"]["mean"] == pytest.approx(statistics.fmean(diffs))
    table = (out / "results.md").read_text()
    assert "| judge score |" in table and "| RM score |" in table and "gold reward" not in table
    assert f"judged by: the judge, a reward model trained on {len(task['judge'])} held-out pairs" in table


def test_the_judge_reads_a_cut_response_as_it_is(run):
    """The judge scores what it is given, as the gold reward does; PPO's no-eos score for a cut
    response stays the training reward model's (rm_score), a rule of what PPO optimised."""
    from plumbing.checkpoint import load_checkpoint
    from evaluate import evaluate_policy, sample_responses
    from reward import load_reward_model, score_ids
    out, _, task, _ = run
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    policy, _ = load_checkpoint(out / "sft", kind="gpt")
    rm, judge = load_reward_model(str(out / "rm")), load_reward_model(str(out / "judge"))
    prompts = task["eval"][:24]
    judged = evaluate_policy(policy, policy, rm, tok, prompts, 12, seed=3, task=task, no_eos_score=-7.0, judge=judge)
    samples = sample_responses(policy, tok, prompts, 12, seed=3)
    finished = [tok.eos_id in r for _, r in samples]
    assert 0 < sum(finished) < len(finished)  # at 12 tokens, some responses are cut
    raw = score_ids(judge, *zip(*samples), tok.pad_id)
    atol = network_atol(raw, 4 * 64, 2)  # from magnitudes (tolerance.py): the micro preset's float32 judge
    assert judged["judge_score"] == pytest.approx(raw.tolist(), abs=atol)
    assert [x == -7.0 for x in judged["rm_score"]] == [not done for done in finished]
    greedy = sample_responses(policy, tok, prompts, 12, 0.0, seed=3)
    assert judged["greedy"] == pytest.approx(score_ids(judge, *zip(*greedy), tok.pad_id).tolist(), abs=atol)


def test_the_judge_is_a_stage_before_eval(run, tmp_path):
    """A new judge redoes the evaluation alone; --stages up to ppo stops before the judge; eval
    alone then needs the judge, in one line."""
    out, path, _, _ = run
    assert mpo.STAGES.index("ppo") < mpo.STAGES.index("judge") == mpo.STAGES.index("eval") - 1
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    proc = run_train(*MICRO, "--data", path, "--out", str(copy), "--compare", "--force", "judge")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reused = read(copy / "results.json")["reused"]
    assert {"sft", "rm", "split", "dpo", "ppo"} <= set(reused) and not {"judge", "eval"} & set(reused)
    shutil.rmtree(copy / "judge")
    shutil.rmtree(copy / "eval")
    proc = run_train(*MICRO, "--data", path, "--out", str(copy), "--compare", "--stages", "tokenizer,sft,rm,split,dpo,ppo")
    assert proc.returncode == 0 and not (copy / "judge").exists(), proc.stderr[-2000:]
    proc = run_process(*MICRO, "--data", path, "--out", str(copy), "--compare", "--stages", "eval")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: stage judge is needed but not complete in {copy / 'judge'}; add judge to --stages"]


def test_too_few_pairs_for_a_judge_is_one_line(tmp_path):
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"}) + "\n"
                            for i in range(3)))
    proc = run_process("--preset", "micro", "--data", str(path), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == (f"error: {path}: 2 pairs after the held-out part, too few to hold out 0.2 of "
                                   "them for the judge and train on at least 2; give more pairs")


def test_the_judge_fraction_is_a_setting_of_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--judge-fraction", "0.3"])
    assert e.value.code == 2 and "--judge-fraction 0.3 holds out pairs of --data" in capsys.readouterr().err
    path = pairs_file(tmp_path / "pairs.jsonl", 100)
    assert train.parse_args(["--data", path, "--judge-fraction", "0.3"]).judge_fraction == 0.3
    a, b = (data.load_task(0, 1.0, lambda m: None, data=path, judge_fraction=f) for f in (0.2, 0.5))
    assert (len(a["judge"]), len(b["judge"])) == (18, 45) and a["key"] != b["key"]
    assert a["held_out"] == b["held_out"]  # the held-out pairs stay as they were
    assert data.load_task(0, 1.0, n_sft=10, n_pref=10)["judge"] is None  # the built-in task has its gold reward


def test_with_eval_data_the_judge_still_comes_from_data(tmp_path):
    train_file, eval_file = pairs_file(tmp_path / "t.jsonl", 50), pairs_file(tmp_path / "e.jsonl", 10)
    task = data.load_task(1, 1.0, lambda m: None, data=train_file, eval_data=eval_file)
    assert len(task["held_out"]) == 10 and len(task["judge"]) == 10 and len(task["pref"]) == 40
    assert not lines(task["judge"]) & lines(task["pref"])


@pytest.mark.skipif(not os.path.exists(HH_FILE), reason="the HH-RLHF file beside the project is absent")
def test_the_real_hh_file_holds_out_a_disjoint_judge_part():
    task = data.load_task(0, 1.0, lambda m: None, data=HH_FILE)
    judge, pref, held_out = lines(task["judge"]), lines(task["pref"]), lines(task["held_out"])
    assert len(held_out) == 230 and len(judge) == round(0.2 * (len(judge) + len(pref))) > 400
    assert not judge & pref and not judge & held_out and not pref & held_out
    assert task["sft"] == [(r["prompt"], r["chosen"]) for r in task["pref"]]  # SFT: the training pairs' chosen side
    again, other = (data.load_task(s, 1.0, lambda m: None, data=HH_FILE) for s in (0, 1))
    assert lines(again["judge"]) == judge and lines(other["judge"]) != judge  # seeded
