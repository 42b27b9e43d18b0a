"""RESULTS.md, its figures and README.md's generated blocks, from the results committed under
results/: one folder per experiment (experiment.json: its title and command) holding one
results.json per seed (seed-S.json), or for a sweep a folder per condition holding them. No number
in the documents is typed by hand; tests/test_publish.py checks that they are what this makes.

    python3 -m publish                                   # regenerate from results/
    python3 -m publish --collect NAME --command CMD --runs RUN_FOLDER...   # file finished runs first
"""
import argparse
import dataclasses
import math
import os
import statistics

from bench import memory as bench_memory
from plumbing.checks import flag
from plumbing.files import DataError, UserError, read_json, write_text
from plumbing.report import (LABELS, REFERENCE_ROWS, aggregate, closing, interval_text, paired_interval, summary_table,
                             svg_plot, t975, table_text)
from publish.collect import collect
from task import gold_reward, prompt_kind, well_formed  # the built-in task's judges, for the samples
from train import PRESETS


# ----------------------------------------------------------------------------- RESULTS.md

BLOCK_END = "<!-- /publish -->"  # README.md's generated blocks end here; each starts <!-- publish: NAME -->


def samples_table(run, kinds=("capital", "legs", "harm"), width=70):
    """The first sample of every method for the first prompt of some kinds of question, with its
    gold reward and a mark where no responder could have written it."""
    rows = [s for kind in kinds for s in run["samples"] if prompt_kind(s["prompt"]) == kind][:len(kinds)]
    lines = ["| method | " + " | ".join(r["prompt"].split("Human: ")[-1].split("\n")[0] for r in rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    for m in run["methods"]:
        cells = []
        for r in rows:
            text = r[m].strip()
            mark = "" if well_formed(r["prompt"], r[m]) else " *(not well formed)*"
            cells.append(f"[{gold_reward(r['prompt'], r[m]):+.1f}] {text if len(text) <= width else text[:width] + ' ...'}{mark}")
        lines.append(f"| {m} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def provenance_line(runs):
    """Where the runs ran: each field's values over the seeds."""
    p = [r.get("provenance") or {} for r in runs]
    values = lambda k: ", ".join(sorted({str(x.get(k)) for x in p}))
    return (f"commit {values('commit')}; {values('date')}; torch {values('torch')}; {values('machine')}, "
            f"{values('threads')} thread(s) per run")


def since_defaults(meta, runs):
    """The flags that make today's defaults the runs' again: every stage setting of the runs' config
    (SFT, reward model, split, DPO, PPO) whose preset default has changed since, unless the
    experiment's command sets it. "" when none has."""
    flags = {}
    for run in runs:
        if run["config"].get("preset") not in PRESETS:  # a preset since removed: nothing to compare with
            continue
        today = dataclasses.asdict(PRESETS[run["config"]["preset"]])
        for stage in ("sft", "rm", "split", "dpo", "ppo"):
            for key, value in run["config"][stage].items():
                name = flag(stage, key)
                if today[stage][key] != value and name not in meta["command"].split():
                    flags[name] = f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
    return " ".join(flags.values())


def main_runs(conditions):
    """A sweep's runs at the command's own settings: its "default" condition's (the other conditions
    of a noise or bias sweep also set the easy set's size), or every condition's."""
    return conditions.get("default") or [r for runs in conditions.values() for r in runs]


def command_text(meta, runs):
    """The experiment's command in backquotes, and the flags that run it again at today's defaults."""
    flags = since_defaults(meta, runs)
    return f"`{meta['command']}`" + (f" with `{flags}`, the defaults when it ran" if flags else "")


def experiment_section(folder, meta, runs):
    """RESULTS.md's section of one experiment folder."""
    seeds = [r["config"]["seed"] for r in runs]
    lines = [f"## {meta['title']}", "", f"{command_text(meta, runs)}, seeds {', '.join(map(str, seeds))} "
             f"({len(seeds)} seed{'s' * (len(seeds) > 1)}); per-seed data: `{folder}/`. {provenance_line(runs)}.", ""]
    if meta.get("about"):
        lines += [meta["about"], ""]
    lines += [summary_table(runs), ""]
    if runs[0].get("reference"):
        share = closing(runs)
        lines.append(f"MPO closes {statistics.fmean(share):.0%} of the distance from SFT to the best possible gold "
                     f"reward (lowest seed {min(share):.0%}, seed {seeds[0]} {share[0]:.0%}).")
    s = aggregate(runs)["split"] if len(runs) > 1 else runs[0]["split"]
    if s.get("easy") is not None:
        lines.append(f"Split (mean over seeds): easy {s['easy']:.0f} and hard {s['hard']:.0f} pairs"
                     + (f"; label agreement with the gold reward: easy {s['easy_label_agreement']:.3f}, hard "
                        f"{s['hard_label_agreement']:.3f}." if s.get("easy_label_agreement") is not None else "."))
    seconds = runs[0].get("seconds")
    if seconds:
        lines.append(f"Seconds per stage, seed {seeds[0]}: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
                     + f"; in all {sum(seconds.values()):.0f}.")
    if runs[0].get("samples") and runs[0].get("reference"):
        lines += ["", f"The first sample of each method on seed {seeds[0]} (gold reward in brackets):", "",
                  samples_table(runs[0])]
    if meta.get("readme") == "excerpt":  # the README shows a few of its columns: here, every one
        lines += ["", f"Seed {seeds[0]}'s own results.md, every column ([docs/metrics.md](docs/metrics.md)):", "",
                  f"```\n{table_text(runs[0]).rstrip()}\n```"]
    return "\n".join(lines)


def first_screen(run):
    """The README's first table: each method's gold reward, well formed, KL to SFT and seconds on one
    seed, then MPO minus stage 1 with its interval, and where it ran."""
    methods, ref = run["methods"], run.get("reference") or {}
    lines = ["| method | gold reward | well formed | KL vs SFT | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {LABELS.get(m, m)} | {row['gold_reward']:+.3f} | {row['well_formed']:.2f} | {row['kl_vs_sft']:.2f} | "
              f"{row['seconds']:.0f} |" for m, row in methods.items()]
    lines += [f"| *{name}* (no training) | {ref[key]:+.3f} | | | |" for key, name in REFERENCE_ROWS if key in ref]
    d = run["vs_mpo"]["mpo_stage1"]
    p = run.get("provenance") or {}
    return "\n".join(lines) + (
        f"\n\nMPO − MPO stage 1: {interval_text(d)} in gold reward (95% t interval, paired over {d['n']} prompts). "
        f"Seed {run['config']['seed']}, commit {p.get('commit')}, {p.get('machine')}; seconds: a method's DPO and PPO "
        "stages and the shared stages it needs.")


def setting(run, vary):
    """The value of a config field of a run: vary "ppo.kl_coef" is run["config"]["ppo"]["kl_coef"]."""
    value = run["config"]
    for key in vary.split("."):
        value = value[key]
    return value


def condition_name(run, vary=None):
    """A sweep's condition: by its labels (the label noise tau and the biased annotators' share), or
    where the sweep varies one setting (experiment.json's "vary": a config field), by its flag."""
    if vary:
        stage, _, name = vary.rpartition(".")
        return f"{flag(stage, name)} {setting(run, vary):g}"
    c = run["config"]
    flips = f", flips {c['label_flips']:g}" if "label_flips" in c else ""  # recorded where above 0
    return f"tau {c['label_noise']:g}, bias {c['annotator_bias']:g}" + flips


def in_order(conditions, vary=None):
    """A sweep's runs ({condition folder: its runs}) as a list: by the varied setting, or by
    annotator bias, then label noise."""
    key = ((lambda runs: setting(runs[0], vary)) if vary else
           (lambda runs: (runs[0]["config"]["annotator_bias"], runs[0]["config"]["label_noise"],
                          runs[0]["config"].get("label_flips", 0.0))))
    return sorted(conditions.values(), key=key)


def sweep_section(rel, meta, conditions):
    """RESULTS.md's section of a sweep ({condition folder: its runs}): the figure of every row's gold
    reward by condition, then per condition its table and what the selection rests on."""
    vary = meta.get("vary")
    runs_of = in_order(conditions, vary)
    labels = [condition_name(runs[0], vary) for runs in runs_of]
    lines = [f"## {meta['title']}", "", f"{command_text(meta, main_runs(conditions))}; per-seed data: "
             f"`{rel}/CONDITION/`. "
             f"{provenance_line([r for runs in runs_of for r in runs])}.", ""]
    if meta.get("about"):
        lines += [meta["about"], ""]
    lines += [f"![gold reward by condition]({rel}/gold-by-condition.svg)", "", conditions_table(runs_of, vary), ""]
    for label, runs in zip(labels, runs_of):
        seeds = len(runs)
        split = aggregate(runs)["split"] if seeds > 1 else runs[0]["split"]
        lines += [f"### {label} ({seeds} seed{'s' * (seeds > 1)})", "", summary_table(runs), "",
                  f"Split (mean over seeds): easy {split['easy']:.0f}, hard {split['hard']:.0f} pairs; label agreement "
                  f"with the gold reward: easy {split['easy_label_agreement']:.3f}, hard {split['hard_label_agreement']:.3f}."]
        if "dpo" in runs[0]["methods"]:
            stage1 = easy_vs_all(runs)
            lines[-1] += (f" DPO on the easy pairs (MPO stage 1) − DPO on all pairs: {interval_text(stage1)} "
                          f"(ahead on {stage1['wins']} of {stage1['n']} seeds).")
        lines.append("")
        if runs[0].get("samples"):
            lines += [f"The first sample of each method on seed {runs[0]['config']['seed']} (gold reward in brackets):",
                      "", samples_table(runs[0]), ""]
    return "\n".join(lines).rstrip()


def easy_vs_all(runs):
    """DPO on the easy pairs (MPO's stage 1) minus DPO on all pairs in gold reward, paired over seeds:
    the paper's premise that the easy pairs alone make the better DPO."""
    return paired_interval([r["methods"]["mpo_stage1"]["gold_reward"] for r in runs],
                           [r["methods"]["dpo"]["gold_reward"] for r in runs])


def sweep_table(runs_of):
    """One column per condition (runs_of: in_order's list): MPO's gold reward, MPO minus every row
    but SFT, paired over seeds (95% t interval, the seeds MPO is ahead on), DPO on the easy pairs minus
    DPO on all pairs and the split's label agreement: the selection's effect beside its mechanism."""
    res = [aggregate(runs) for runs in runs_of]
    cell = lambda d: f"{interval_text(d, '{:+.2f}')}, {d['wins']}/{d['n']}"
    lines = ["| | " + " | ".join(f"{condition_name(runs[0])} ({len(runs)} seeds)" for runs in runs_of) + " |",
             "|---" * (len(runs_of) + 1) + "|",
             "| MPO's gold reward | " + " | ".join(
                 f"{r['methods']['mpo']['gold_reward']:+.2f} ± {r['methods']['mpo']['gold_reward_std']:.2f}"
                 for r in res) + " |"]
    for m in [m for m in res[0]["vs_mpo"] if m != "sft"]:
        lines.append(f"| MPO − {LABELS.get(m, m)} | " + " | ".join(cell(r["vs_mpo"][m]) for r in res) + " |")
    easy = [easy_vs_all(runs) for runs in runs_of]
    lines.append("| DPO on the easy pairs − DPO on all | " + " | ".join(map(cell, easy)) + " |")
    lines.append("| label agreement with gold, easy / hard | " + " | ".join(
        f"{r['split']['easy_label_agreement']:.2f} / {r['split']['hard_label_agreement']:.2f}" for r in res) + " |")
    if any("label_flips" in runs[0]["config"] for runs in runs_of):  # labels flipped at random: where they went
        share = lambda runs, part: statistics.fmean(r["split"].get("flipped_share", {}).get(part, 0.0) for r in runs)
        lines.append("| flipped labels' share, easy / hard | " + " | ".join(
            f"{share(runs, 'easy'):.2f} / {share(runs, 'hard'):.2f}" for runs in runs_of) + " |")
    return "\n".join(lines)


def setting_table(runs_of, vary):
    """One column per value of the varied setting (runs_of: in_order's list, each holding the same
    seeds): MPO's gold reward and share well formed, each minus the first column's paired over seeds
    (95% t interval, the seeds ahead), the share of the distance from SFT to the best possible it
    closes, its KL to SFT and its length."""
    seeds = [[r["config"]["seed"] for r in runs] for runs in runs_of]
    if any(s != seeds[0] for s in seeds):
        raise DataError(f"a sweep of {vary} pairs seeds: every condition must hold the same ones, not {seeds}")
    mpo = lambda runs, key: [r["methods"]["mpo"][key] for r in runs]
    mean = lambda runs, key: statistics.fmean(mpo(runs, key))

    def versus_first(runs, key, fmt):
        if runs is runs_of[0]:
            return "—"
        d = paired_interval(mpo(runs, key), mpo(runs_of[0], key))
        return f"{interval_text(d, fmt)}, {d['wins']}/{d['n']}"
    rows = [("MPO's gold reward", lambda runs: f"{mean(runs, 'gold_reward'):+.2f} ± "
                                               f"{statistics.stdev(mpo(runs, 'gold_reward')):.2f}"),
            ("MPO's gold − the first column's", lambda runs: versus_first(runs, "gold_reward", "{:+.2f}")),
            ("MPO well formed (lowest seed)", lambda runs: f"{mean(runs, 'well_formed'):.3f} "
                                                           f"({min(mpo(runs, 'well_formed')):.3f})"),
            ("MPO well formed − the first column's", lambda runs: versus_first(runs, "well_formed", "{:+.3f}")),
            ("MPO closes of SFT to best possible (lowest seed)",
             lambda runs: f"{statistics.fmean(closing(runs)):.0%} ({min(closing(runs)):.0%})"),
            ("MPO's KL to SFT, length", lambda runs: f"{mean(runs, 'kl_vs_sft'):.2f}, {mean(runs, 'length'):.1f}")]
    lines = ["| | " + " | ".join(f"{condition_name(runs[0], vary)} ({len(runs)} seeds)" for runs in runs_of) + " |",
             "|---" * (len(runs_of) + 1) + "|"]
    return "\n".join(lines + [f"| {name} | " + " | ".join(map(cell, runs_of)) + " |" for name, cell in rows])


def conditions_table(runs_of, vary=None):
    """A sweep's table, one column per condition: of one varied setting, or of the labelings."""
    return setting_table(runs_of, vary) if vary else sweep_table(runs_of)


def seed_range(conditions):
    """The seeds every condition of a sweep holds, as "0-7" (or "0, 2, 5" when not a range)."""
    seeds = sorted(set.intersection(*({r["config"]["seed"] for r in runs} for runs in conditions.values())))
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def sweep_figure(conditions, vary=None):
    """The SVG of each row's gold reward by condition: mean over seeds with its 95% t band."""
    runs_of = in_order(conditions, vary)
    rows = [m for m in runs_of[0][0]["methods"] if all(m in runs[0]["methods"] for runs in runs_of)]
    series = []
    for m in rows:
        stats = []
        for runs in runs_of:
            xs = [r["methods"][m]["gold_reward"] for r in runs]
            half = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
            stats.append((statistics.fmean(xs), half))
        means = [s for s, _ in stats]
        series.append((m, list(range(len(runs_of))), means, ([s - h for s, h in stats], [s + h for s, h in stats])))
    return svg_plot(series, "condition", "gold reward", "Gold reward by condition (mean over seeds, 95% t band)",
                    width=720, height=360, xticks=[condition_name(runs[0], vary) for runs in runs_of])


def seed_files(folder):
    """The results.json of each seed in a folder (seed-S.json), by seed."""
    return sorted((read_json(os.path.join(folder, f)) for f in os.listdir(folder)
                   if f.startswith("seed-") and f.endswith(".json")), key=lambda r: r["config"]["seed"])


def experiments(root):
    """Every experiment folder under root, in the order of their experiment.json's "order": one
    seed-S.json per seed, or for a sweep ("sweep": true) a folder per condition holding them."""
    found = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.exists(os.path.join(folder, "experiment.json")):
            meta = read_json(os.path.join(folder, "experiment.json"))
            runs = ({c: seed_files(os.path.join(folder, c)) for c in sorted(os.listdir(folder))
                     if os.path.isdir(os.path.join(folder, c))} if meta.get("sweep") else seed_files(folder))
            found.append((meta.get("order", 99), name, meta, runs))
    return [(name, meta, runs) for _, name, meta, runs in sorted(found, key=lambda e: e[:2])]


def render(root="results"):
    """{path: text} of every generated file: RESULTS.md and README.md beside the folder root (the
    latter with its generated blocks replaced) and the figures. Nothing is written here."""
    root = os.path.normpath(root)
    base, rel = os.path.dirname(os.path.abspath(root)), os.path.basename(root)
    out, sections, blocks = {}, [], {}
    for name, meta, runs in experiments(root):
        if meta.get("sweep"):  # runs: {condition: its runs}
            sections.append(sweep_section(f"{rel}/{name}", meta, runs))
            out[os.path.join(root, name, "gold-by-condition.svg")] = sweep_figure(runs, meta.get("vary"))
            if meta.get("readme") == "sweep":  # README.md's block: the table of MPO minus each row, the figure linked
                blocks[name] = (f"{command_text(meta, main_runs(runs))}, seeds {seed_range(runs)} "
                                f"([figure]({rel}/{name}/gold-by-condition.svg)):\n\n"
                                f"{conditions_table(in_order(runs, meta.get('vary')), meta.get('vary'))}")
            continue
        sections.append(experiment_section(f"{rel}/{name}", meta, runs))
        curves, seed = runs[0].get("curves"), runs[0]["config"]["seed"]
        if curves:
            series = [(k, [c["iteration"] for c in curves], [c[k] for c in curves], None)
                      for k in ("score", "gold", "kl") if k in curves[0]]
            out[os.path.join(root, name, "ppo-curves.svg")] = svg_plot(
                series, "PPO iteration", "mean over the rollouts", f"MPO's stage 2 (PPO on the hard prompts), seed {seed}")
            sections[-1] += f"\n\n![MPO's stage 2, seed {seed}]({rel}/{name}/ppo-curves.svg)"
        if meta.get("readme") == "table":  # README.md's block: the table over seeds
            blocks[name] = f"{command_text(meta, runs)}, {len(runs)} seed{'s' * (len(runs) > 1)}:\n\n{summary_table(runs)}"
        elif meta.get("readme") == "excerpt":  # README.md's block: the first seed's main figures, and its curve
            blocks[name] = first_screen(runs[0]) + (f"\n\n![MPO's stage 2]({rel}/{name}/ppo-curves.svg)" if curves else "")
    bench = os.path.join(root, "bench")
    for path in sorted(os.listdir(bench)) if os.path.isdir(bench) else []:
        if not path.endswith(".txt"):  # the figures as printed; memory.json is their data, a .log what a run printed
            continue
        text = open(os.path.join(bench, path)).read().rstrip()
        sections.append(f"## Benchmark: {rel}/bench/{path}\n\n```\n{text}\n```")
    out[os.path.join(base, "RESULTS.md")] = (
        f"# Results\n\nGenerated by `python3 -m publish` from the files under {rel}/ (one results.json "
        "per run and seed, bench output as printed): edit those, not this file.\n\n" + "\n\n".join(sections) + "\n")
    blocks |= bench_memory.doc_blocks(os.path.join(bench, "memory.json"))
    for doc in (os.path.join(base, "README.md"), os.path.join(base, "docs", "running.md")):
        if os.path.exists(doc):
            text = open(doc).read()
            for name, block in blocks.items():  # <!-- publish: NAME --> ... <!-- /publish -->
                start = f"<!-- publish: {name} -->"
                if start in text:
                    head, rest = text.split(start)
                    text = head + start + "\n" + block + "\n" + BLOCK_END + rest.split(BLOCK_END, 1)[1]
            out[doc] = text
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="python3 -m publish: regenerate RESULTS.md, its figures and "
                                "README.md's generated blocks from the committed results. With --collect NAME: "
                                "file finished run folders under results/NAME first.")
    p.add_argument("root", nargs="?", default="results", help="the results folder (default: results)")
    p.add_argument("--collect", metavar="NAME", help="the experiment's folder name under root")
    p.add_argument("--command", default="", help="with --collect: the command the runs ran")
    p.add_argument("--title", default="", help="with --collect: the experiment's heading")
    p.add_argument("--runs", nargs="+", default=[], help="with --collect: finished run folders, one per seed")
    a = p.parse_args(argv)
    try:
        if a.collect:
            collect(a.collect, a.command, a.title, a.runs, a.root)
        generated = render(a.root)  # all of it before a file is written
    except UserError as e:  # a results file: one line, status 2
        p.exit(2, f"error: {e}\n")
    for path, text in generated.items():
        write_text(path, text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
