"""publish/documents.py: RESULTS.md, its figures and the README's tables are generated from the
committed results/, so no number in them can drift from its data; and the generator itself on a
small example computed by hand."""
import dataclasses
import json
import os
import shutil

import pytest

from publish import collect, documents as publish
from task import make_task, prompt_kind
from train import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_committed_documents_are_what_publish_py_makes_of_the_committed_data():
    generated = publish.render(os.path.join(ROOT, "results"))
    assert os.path.join(ROOT, "RESULTS.md") in generated
    for path, text in generated.items():
        with open(path) as f:
            assert f.read() == text, f"{os.path.relpath(path, ROOT)} is stale: run python3 -m publish"


def fake_run(seed, sft, mpo, dpo, well_formed=0.95):
    row = lambda gold: {"gold_reward": gold, "rm_score": 0.5, "well_formed": well_formed, "kl_vs_sft": 1.0, "length": 12.0,
                        "dpo_pairs": 64, "ppo_rollouts": 0, "seconds": 10.0}
    return {"methods": {"sft": row(sft), "mpo": row(mpo), "dpo": row(dpo)}, "vs_mpo": {},
            "reference": {"best_possible": 2.5, "best_constant": 0.5},
            "split": {"delta": 1.0, "easy": 800 + seed, "hard": 1200 - seed, "easy_label_agreement": 0.9,
                      "hard_label_agreement": 0.7},
            "seconds": {"sft": 100.0, "ppo": 50.0}, "config": {"seed": seed},
            "provenance": {"commit": "abc1234", "date": "2026-01-01", "torch": "2.13.0", "machine": "2-core CPU",
                           "threads": 1},
            "curves": [{"iteration": i, "score": 0.1 * i, "kl": 0.01 * i} for i in range(3)]}


@pytest.fixture
def example(tmp_path):
    root = tmp_path / "results"
    (root / "toy").mkdir(parents=True)
    (root / "toy" / "experiment.json").write_text(json.dumps({"title": "Toy", "command": "python3 train.py",
                                                              "readme": "table"}))
    # MPO - DPO over seeds: 0.2, 0.4, 0.3 -> mean 0.3, sd 0.1, t(2) 4.303: half width 0.2484
    for seed, (sft, mpo, dpo) in enumerate([(-0.5, 1.2, 1.0), (-0.4, 1.4, 1.0), (-0.6, 1.1, 0.8)]):
        (root / "toy" / f"seed-{seed}.json").write_text(json.dumps(fake_run(seed, sft, mpo, dpo, 0.9 + 0.01 * seed)))
    (root / "bench").mkdir()
    (root / "bench" / "cpu.txt").write_text("# python3 -m bench\nlm step 1,000 tokens/s\n")
    (tmp_path / "README.md").write_text("intro\n<!-- publish: toy -->\nstale table\n" + publish.BLOCK_END + "\nend\n")
    return tmp_path


def test_render_on_a_small_example_computed_by_hand(example):
    out = publish.render(str(example / "results"))
    results = out[str(example / "RESULTS.md")]
    assert ("| DPO (all pairs, ref SFT) | +0.933 ± 0.115 | +0.500 | 0.91 (0.90) | 1.00 | 12.0 | 64 | 0 | 10 | "
            "+0.300 [+0.052, +0.548] | 3 of 3 |") in results
    assert "| **MPO** (then PPO on hard, ref DPO) | +1.233 ± 0.153 |" in results
    # MPO closes (1.2 + 0.5) / 3.0, (1.4 + 0.4) / 2.9, (1.1 + 0.6) / 3.1 of the distance: mean 0.5786
    assert "MPO closes 58% of the distance from SFT to the best possible gold reward (lowest seed 55%, seed 0 57%)" in results
    assert "commit abc1234; 2026-01-01; torch 2.13.0; 2-core CPU, 1 thread(s) per run" in results
    assert "lm step 1,000 tokens/s" in results and "![MPO's stage 2, seed 0](results/toy/ppo-curves.svg)" in results
    readme = out[str(example / "README.md")]
    assert readme.startswith("intro\n<!-- publish: toy -->\n`python3 train.py`, 3 seeds") and readme.endswith(
        publish.BLOCK_END + "\nend\n") and "stale table" not in readme
    svg = out[str(example / "results" / "toy" / "ppo-curves.svg")]
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and ">score<" in svg and ">kl<" in svg
    assert publish.render(str(example / "results")) == out  # the same data, the same bytes


def test_collect_files_a_run_without_weights(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "ppo").mkdir()
    results = fake_run(3, -0.5, 1.2, 1.0)
    del results["curves"]
    (run / "results.json").write_text(json.dumps({**results, "policies": {"mpo": "ppo"}}))
    prompts = make_task(0, n_sft=1, n_pref=2)["eval"][:30]
    (run / "eval" / "samples.json").write_text(json.dumps([{"prompt": p, "mpo": "a"} for p in prompts]))
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "score": 1.0, "entropy": 2.0}) + "\n"
                                                       for i in range(4)))
    (run / "ppo" / "model.safetensors").write_bytes(b"weights")
    collect.collect("toy", "python3 train.py --seed 3", "Toy", [str(run)], str(tmp_path / "results"))
    filed = json.loads((tmp_path / "results" / "toy" / "seed-3.json").read_text())
    kinds = [prompt_kind(s["prompt"]) for s in filed["samples"]]  # the first prompt of each kind
    assert sorted(kinds) == sorted(set(map(prompt_kind, prompts))) and filed["samples"][0]["prompt"] == prompts[0]
    assert filed["curves"] == [{"iteration": i, "score": 1.0} for i in range(4)]
    assert sorted(os.listdir(tmp_path / "results" / "toy")) == ["experiment.json", "seed-3.json"]
    assert json.loads((tmp_path / "results" / "toy" / "experiment.json").read_text()) == {
        "title": "Toy", "command": "python3 train.py --seed 3"}
    shutil.rmtree(run)


def test_a_sweeps_table_of_mpo_minus_each_row_computed_by_hand(tmp_path):
    root = tmp_path / "results" / "sel"
    meta = {"title": "Sel", "command": "python3 train.py --noise-sweep 4", "sweep": True, "readme": "sweep"}
    root.mkdir(parents=True)
    (root / "experiment.json").write_text(json.dumps(meta))
    # per condition and seed: (MPO, random split, MPO stage 1, DPO)
    golds = {(1, "default"): [(1.2, 1.0, 0.5, 0.6), (1.4, 1.0, 0.6, 0.8), (1.1, 0.8, 0.4, 0.5)],
             (4, "noise-4"): [(0.9, 0.9, 0.5, 0.5), (1.0, 0.7, 0.5, 0.5), (0.8, 0.9, 0.5, 0.5)]}
    for (tau, folder), rows in golds.items():
        (root / folder).mkdir()
        for seed, (mpo, random, stage1, dpo) in enumerate(rows):
            run = fake_run(seed, -0.5, mpo, dpo)
            run["methods"]["mpo_stage1"] = {**run["methods"]["dpo"], "gold_reward": stage1}
            run["methods"]["random_split"] = {**run["methods"]["dpo"], "gold_reward": random}
            run["config"] = {"seed": seed, "label_noise": tau, "annotator_bias": 0.0}
            (root / folder / f"seed-{seed}.json").write_text(json.dumps(run))
    (tmp_path / "README.md").write_text("<!-- publish: sel -->\n" + publish.BLOCK_END + "\n")
    readme = publish.render(str(tmp_path / "results"))[str(tmp_path / "README.md")]
    lines = readme.splitlines()
    assert lines[1] == "`python3 train.py --noise-sweep 4`, seeds 0-2 ([figure](results/sel/gold-by-condition.svg)):"
    assert lines[3] == "| | tau 1, bias 0 (3 seeds) | tau 4, bias 0 (3 seeds) |"
    assert lines[5] == "| MPO's gold reward | +1.23 ± 0.15 | +0.90 ± 0.10 |"
    # tau 1: MPO - random split 0.2, 0.4, 0.3: mean 0.3, sd 0.1, half width 4.303 * 0.1 / sqrt(3) = 0.248
    # tau 4: 0.0, 0.3, -0.1: mean 0.067, sd 0.208, half width 0.517; MPO ahead on one seed (a tie is no win)
    assert ("| MPO − random split (random sets of MPO's sizes) | +0.30 [+0.05, +0.55], 3/3 | "
            "+0.07 [-0.45, +0.58], 1/3 |") in lines
    # stage 1 - DPO: -0.1, -0.2, -0.1: mean -0.133, sd 0.0577, half width 0.143; at tau 4 every seed ties
    assert "| DPO on the easy pairs − DPO on all | -0.13 [-0.28, +0.01], 0/3 | +0.00 [+0.00, +0.00], 0/3 |" in lines
    assert lines[-2] == "| label agreement with gold, easy / hard | 0.90 / 0.70 | 0.90 / 0.70 |"
    assert not any(line.startswith("| MPO − SFT") for line in lines)


def test_a_sweep_of_one_setting_pairs_mpo_with_the_first_value_by_hand(tmp_path):
    root = tmp_path / "results" / "kl"
    meta = {"title": "KL", "command": "python3 train.py --ppo-kl-coef K", "sweep": True, "vary": "ppo.kl_coef"}
    root.mkdir(parents=True)
    (root / "experiment.json").write_text(json.dumps(meta))
    # per value and seed: MPO's (gold, well formed); SFT's gold -0.5, the best possible 2.5
    rows = {1.0: [(1.1, 0.93), (1.4, 0.94), (1.2, 0.92)], 0.5: [(1.2, 0.90), (1.4, 0.92), (1.1, 0.91)]}
    for kl, seeds in rows.items():
        (root / f"kl-{kl:g}").mkdir()
        for seed, (gold, formed) in enumerate(seeds):
            run = fake_run(seed, -0.5, gold, 0.0)
            del run["methods"]["dpo"]  # no DPO row: no "DPO on the easy pairs − DPO on all"
            run["methods"]["mpo"]["well_formed"] = formed
            run["config"] = {"seed": seed, "label_noise": 1.0, "annotator_bias": 0.0, "ppo": {"kl_coef": kl}}
            (root / f"kl-{kl:g}" / f"seed-{seed}.json").write_text(json.dumps(run))
    lines = publish.render(str(tmp_path / "results"))[str(tmp_path / "RESULTS.md")].splitlines()
    table = lines[lines.index("| | --ppo-kl-coef 0.5 (3 seeds) | --ppo-kl-coef 1 (3 seeds) |"):][:8]
    assert table[2:] == [
        "| MPO's gold reward | +1.23 ± 0.15 | +1.23 ± 0.15 |",
        # gold -0.1, 0.0, +0.1: mean 0, sd 0.1, half width 4.303 * 0.1 / sqrt(3) = 0.248; ahead on one seed
        "| MPO's gold − the first column's | — | +0.00 [-0.25, +0.25], 1/3 |",
        "| MPO well formed (lowest seed) | 0.910 (0.900) | 0.930 (0.920) |",
        # well formed +0.03, +0.02, +0.01: mean 0.02, sd 0.01, half width 0.0248
        "| MPO well formed − the first column's | — | +0.020 [-0.005, +0.045], 3/3 |",
        # (gold + 0.5) / 3: 0.567, 0.633, 0.533 at 0.5 and 0.533, 0.633, 0.567 at 1
        "| MPO closes of SFT to best possible (lowest seed) | 58% (53%) | 58% (53%) |",
        "| MPO's KL to SFT, length | 1.00, 12.0 | 1.00, 12.0 |"]
    assert "### --ppo-kl-coef 1 (3 seeds)" in lines and not any("DPO on the easy pairs" in line for line in lines)


def test_a_setting_sweep_whose_conditions_hold_other_seeds_is_one_line_and_status_2(tmp_path, capsys):
    root = tmp_path / "results" / "kl"
    root.mkdir(parents=True)
    (root / "experiment.json").write_text(json.dumps({"title": "KL", "command": "c", "sweep": True, "vary": "ppo.kl_coef"}))
    for kl, seeds in {0.5: [0, 1], 1.0: [0, 1, 2]}.items():
        (root / f"kl-{kl:g}").mkdir()
        for seed in seeds:
            run = fake_run(seed, -0.5, 1.0, 0.5)
            run["config"] = {"seed": seed, "label_noise": 1.0, "annotator_bias": 0.0, "ppo": {"kl_coef": kl}}
            (root / f"kl-{kl:g}" / f"seed-{seed}.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit) as e:
        publish.main([str(tmp_path / "results")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: a sweep of ppo.kl_coef pairs seeds: every condition must hold the same ones, not [[0, 1], [0, 1, 2]]\n"
    assert not (tmp_path / "RESULTS.md").exists()


def test_a_command_names_the_defaults_that_changed_since_its_runs(tmp_path):
    config = dataclasses.asdict(PRESETS["tiny"])
    config = {"preset": "tiny", "seed": 0, **{stage: config[stage] for stage in ("sft", "rm", "split", "dpo", "ppo")}}
    config["sft"]["steps"] += 400
    config["split"]["delta"] = 0.25
    config["ppo"]["kl_coef"] = 0.25  # set by the command: not a default that changed
    config["ppo"]["clip"] = 0.5  # --ppo-clip-value in the command is another flag
    meta = {"command": "python3 train.py --ppo-kl-coef 0.25 --ppo-clip-value 0.2"}
    assert publish.command_text(meta, [{"config": config}]) == (
        f"`{meta['command']}` with `--sft-steps {PRESETS['tiny'].sft.steps + 400} --delta 0.25 --ppo-clip 0.5`, "
        "the defaults when it ran")
    today = {**config, "sft": dataclasses.asdict(PRESETS["tiny"].sft), "split": dataclasses.asdict(PRESETS["tiny"].split)}
    today["ppo"] = {**config["ppo"], "clip": PRESETS["tiny"].ppo.clip}
    assert publish.command_text(meta, [{"config": today}]) == f"`{meta['command']}`"
