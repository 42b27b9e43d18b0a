"""python3 -m publish --collect NAME --command CMD --runs RUN_FOLDER...: finished run folders filed
under results/NAME, one small JSON per seed (no weights), for publish/documents.py to render."""
import json
import os

from plumbing.files import read_json, write_json
from task import prompt_kind


def first_of_each_kind(samples, results):
    """The samples of the first prompt of each kind of question (the built-in task's), or the first
    three prompts' (real data)."""
    if results.get("reference") is None:
        return samples[:3]
    firsts = {}
    for s in samples:
        firsts.setdefault(prompt_kind(s["prompt"]), s)
    return list(firsts.values())


def collect(name, command, title, run_dirs, root="results"):
    """Files finished runs as results/NAME/seed-S.json: each run's results.json with samples of
    eval/samples.json (first_of_each_kind) and MPO's PPO curve (ppo/metrics.jsonl). No weights."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, "experiment.json")
    meta = read_json(meta_path) if os.path.exists(meta_path) else {}
    sweep = False
    for run in run_dirs:  # a sweep's conditions are folders of the run folder, each with its results.json
        conditions = sorted(c for c in os.listdir(run) if os.path.exists(os.path.join(run, c, "results.json")))
        sweep = sweep or bool(conditions)
        for source, target in [(run, "default" if conditions else "")] + [(os.path.join(run, c), c) for c in conditions]:
            collect_one(source, os.path.join(folder, target), curves=not conditions)
    write_json(meta_path, {**meta, "title": title or meta.get("title", name), "command": command or meta["command"],
                           **({"sweep": True} if sweep else {})})


def collect_one(run, folder, curves=True):
    """One run folder's results.json, with its samples and (curves) MPO's PPO curve, as FOLDER/seed-S.json."""
    results = read_json(os.path.join(run, "results.json"))
    results["samples"] = first_of_each_kind(read_json(os.path.join(run, "eval", "samples.json")), results)
    summary = os.path.join(run, "split", "summary.json")  # runs from before results.json kept the flipped share
    if "flipped_share" not in results["split"] and os.path.exists(summary) and "flipped_share" in read_json(summary):
        results["split"]["flipped_share"] = read_json(summary)["flipped_share"]
    ppo = os.path.join(run, results.get("policies", {}).get("mpo", "ppo"), "metrics.jsonl")
    if curves and os.path.exists(ppo):
        keep = ("iteration", "score", "rm_score", "gold", "kl")
        results["curves"] = [{k: row[k] for k in keep if k in row} for row in map(json.loads, open(ppo))]
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"seed-{results['config']['seed']}.json"), results)
