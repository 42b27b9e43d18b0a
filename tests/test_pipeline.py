"""The pipeline on the micro preset: end to end, reuse, wiring, and each stage moving the right way."""
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

import data
from cli import run_train
from plumbing.checkpoint import load_checkpoint
from task import FACTS, gold_reward, make_task
from plumbing.tokenizer import Tokenizer
from tolerance import network_atol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_WIDEST = 4 * 64  # the micro preset's longest sum: its MLP's 4 n_embd (tolerance.network_atol)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "micro"
    proc = run_train("--preset", "micro", "--out", str(out), "--compare", "--export-hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def read(path):
    with open(path) as f:
        return json.load(f)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_pipeline_end_to_end(run_dir):
    """All stages on micro, with --compare; results.json is complete."""
    out = run_dir
    results = read(out / "results.json")
    assert set(results["methods"]) == {"sft", "mpo_stage1", "mpo", "dpo", "ppo", "ppo_matched"}
    for row in results["methods"].values():
        assert {"gold_reward", "greedy", "well_formed", "rm_score", "win_vs_sft", "tie_vs_sft", "loss_vs_sft",
                "win_rate_vs_sft", "win_vs_chosen", "kl_vs_sft", "length"} <= set(row)
        assert 0 <= row["well_formed"] <= 1
    assert results["reference"]["best_possible"] == 2.5
    assert 0 < results["reference"]["best_constant"] < 2.5 and results["win_rate_judge"] == "gold reward"
    table = (out / "results.md").read_text()
    assert "well formed" in table and "| *best possible* | +2.500 |" in table and "| *best constant* |" in table
    assert results["methods"]["sft"]["win_rate_vs_sft"] == 0.5
    assert set(results["vs_mpo"]) == {"sft", "mpo_stage1", "dpo", "ppo", "ppo_matched"} and "MPO − method (95% CI)" in table
    mean, low, high = (results["vs_mpo"]["sft"][k] for k in ("mean", "low", "high"))
    judged = read(out / "eval" / "judged.json")
    diffs = [a - b for a, b in zip(judged["mpo"]["gold_reward"], judged["sft"]["gold_reward"])]
    assert low < mean < high and mean == pytest.approx(sum(diffs) / len(diffs))
    assert results["config"]["eval_samples"] == 4
    assert {"delta", "easy", "hard", "easy_label_agreement", "hard_label_agreement"} <= set(results["split"])
    assert results["split"]["easy"] + results["split"]["hard"] == 300
    assert {"tokenizer", "sft", "rm", "split", "dpo", "ppo", "dpo_all", "ppo_baseline", "eval"} <= set(results["seconds"])
    assert (out / "results.md").read_text().startswith("| method |")


def test_ppo_iterations_scale_with_the_prompt_pool(run_dir):
    """PPO on all prompts runs --ppo-iterations; MPO's stage 2 on the hard set its share of them,
    and the matched baseline as many as MPO's stage 2, on all prompts."""
    split = read(run_dir / "split" / "summary.json")
    iterations = lambda stage: len((run_dir / stage / "metrics.jsonl").read_text().splitlines())
    mpo = round(8 * split["hard"] / (split["easy"] + split["hard"]))
    assert iterations("ppo_baseline") == 8 and iterations("ppo") == mpo == iterations("ppo_matched") < 8
    assert sum(split["kinds"]["easy"].values()) == split["easy"] and set(split["kinds"]["hard"]) <= set(FACTS) | {"harm"}


SELECTION_ROWS = ["no_selection", "reversed", "random_split", "abs_gap", "gold_split", "dpo_then_ppo_all"]


def test_ablation_rows_and_the_quantile_noise_sweep(run_dir, tmp_path):
    """The split ablations run from one table row each; every row that tests the selection samples
    MPO's PPO rollouts, and its seconds count the shared stages it needs; the gold split keeps the
    easy size of the reward model's. The noise and bias sweeps (a second run: their rows are the main
    run's) keep the easy size of the main run while the labels change, and share its SFT."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    proc = run_train("--preset", "micro", "--out", str(copy), "--compare",  # a shorter evaluation than the main run's
                     "--ablations", ",".join(SELECTION_ROWS + ["dpo_then_dpo_hard"]), "--eval-prompts", "12", "--eval-samples", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = read(copy / "results.json")
    rows = results["methods"]
    assert set(SELECTION_ROWS + ["dpo_then_dpo_hard"]) <= set(rows)
    assert all(rows[m]["ppo_rollouts"] == rows["mpo"]["ppo_rollouts"] > 0 for m in SELECTION_ROWS + ["ppo_matched"])
    assert rows["ppo"]["ppo_rollouts"] > rows["mpo"]["ppo_rollouts"] and rows["mpo_stage1"]["ppo_rollouts"] == 0
    assert rows["dpo"]["dpo_pairs"] > rows["mpo"]["dpo_pairs"] > 0 and rows["ppo"]["dpo_pairs"] == 0
    seconds = results["seconds"]
    assert rows["mpo"]["seconds"] > seconds["rm"] + seconds["split"] and rows["dpo"]["seconds"] < seconds["dpo_all"]
    split, gold = read(copy / "split" / "summary.json"), read(copy / "split_gold" / "summary.json")
    assert gold["easy"] == split["easy"] and gold["easy_label_agreement"] > gold["hard_label_agreement"]
    assert read(copy / "split_abs" / "summary.json")["gap"] == "abs"
    assert read(copy / "dpo_then_dpo_hard" / "done.json")["summary"]["pairs"] == split["hard"]

    proc = run_train("--preset", "micro", "--out", str(copy), "--noise-sweep", "4", "--bias-sweep", "0.5",
                     "--eval-prompts", "12", "--eval-samples", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read(copy / "results.json")["methods"]
    noisy = read(copy / "noise-4" / "split" / "summary.json")
    assert noisy["easy"] == split["easy"] and read(copy / "noise-4" / "results.json")["config"]["label_noise"] == 4
    biased = read(copy / "bias-0.5" / "results.json")
    assert biased["config"]["annotator_bias"] == 0.5 and biased["split"]["easy"] == split["easy"]
    assert set(biased["methods"]) == set(rows) and biased["reused"][:2] == ["tokenizer", "sft"]
    assert not (copy / "bias-0.5" / "sft").exists()  # the main run's SFT, shared


def test_seeds_give_per_seed_rows_and_paired_intervals(tmp_path):
    out = tmp_path / "seeds"
    proc = run_train("--preset", "micro", "--out", str(out), "--seeds", "2", "--eval-samples", "2", "--eval-prompts", "12",
                     "--sft-steps", "40", "--rm-epochs", "1", "--ppo-iterations", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = read(out / "results.json")
    assert results["seeds"] == [0, 1] and all(len(rows) == 2 for rows in results["per_seed"].values())
    mpo, sft = ([read(out / f"seed-{s}" / "results.json")["methods"][m]["gold_reward"] for s in (0, 1)] for m in ("mpo", "sft"))
    mean, low, high = (results["vs_mpo"]["sft"][k] for k in ("mean", "low", "high"))
    assert mean == pytest.approx((mpo[0] - sft[0] + mpo[1] - sft[1]) / 2) and low < mean < high
    assert "paired over 2 seeds" in (out / "results.md").read_text()


def test_second_run_reuses_every_stage(run_dir):
    out = run_dir
    before = read(out / "results.json")
    proc = run_train("--preset", "micro", "--out", str(out), "--compare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = read(out / "results.json")
    assert set(after["reused"]) == set(after["seconds"])
    assert after["methods"] == before["methods"]
    assert "reused stages:" in proc.stdout


def test_changed_setting_redoes_that_stage_and_after(run_dir, tmp_path):
    """A new delta redoes the split and everything downstream of it, and reuses the rest."""
    out = run_dir
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    proc = run_train("--preset", "micro", "--out", str(copy), "--easy-fraction", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = read(copy / "results.json")
    assert {"tokenizer", "sft", "rm"} <= set(results["reused"])
    assert not {"split", "dpo", "ppo", "eval"} & set(results["reused"])
    assert results["split"]["easy"] == 150


def test_evaluation_settings_are_in_the_fingerprint(run_dir, tmp_path):
    """A new evaluation temperature redoes the evaluation alone; nothing is silently reused."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    proc = run_train("--preset", "micro", "--out", str(copy), "--compare", "--eval-temperature", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = read(copy / "results.json")
    assert "eval" not in results["reused"] and {"sft", "rm", "split", "dpo", "ppo"} <= set(results["reused"])
    assert results["config"]["eval_temperature"] == 0.5


def test_stopping_after_dpo_trains_every_methods_dpo_stage(run_dir, tmp_path):
    """--stages ending at dpo runs stage 1 of every method asked for (the baselines' too)."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    subprocess.run(["rm", "-r", str(copy / "dpo_all")], check=True)
    proc = run_train("--preset", "micro", "--out", str(copy), "--compare", "--stages", "tokenizer,sft,rm,split,dpo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (copy / "dpo_all" / "done.json").exists()


def test_references_are_wired_by_the_weights_loaded(run_dir):
    """Stage 2 of MPO starts from and is referenced to the DPO policy; the PPO baseline to SFT."""
    out = run_dir
    sft, dpo, dpo_all = (sha(out / s / "model.safetensors") for s in ("sft", "dpo", "dpo_all"))
    assert len({sft, dpo, dpo_all}) == 3
    ppo = read(out / "ppo" / "config.json")
    assert ppo["reference_sha256"] == dpo and ppo["init_sha256"] == dpo
    baseline = read(out / "ppo_baseline" / "config.json")
    assert baseline["reference_sha256"] == sft and baseline["init_sha256"] == sft
    stage1 = read(out / "dpo" / "config.json")
    assert stage1["reference_sha256"] == sft
    # stage 1 trains on the easy pairs only, the DPO baseline on all of them
    assert read(out / "dpo" / "done.json")["summary"]["pairs"] == read(out / "split" / "summary.json")["easy"]
    assert read(out / "dpo_all" / "done.json")["summary"]["pairs"] == 300


def test_split_files_and_agreement(run_dir):
    out = run_dir
    easy, hard = read(out / "split" / "easy.json"), read(out / "split" / "hard.json")
    gaps = read(out / "split" / "gaps.json")
    delta = read(out / "split" / "summary.json")["delta"]
    assert sorted(easy + hard) == list(range(len(gaps)))
    assert all(gaps[i] > delta for i in easy) and all(gaps[i] <= delta for i in hard)


def test_sft_lowers_the_loss(run_dir):
    out = run_dir
    losses = [json.loads(l)["loss"] for l in open(out / "sft" / "metrics.jsonl")]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_reward_model_beats_chance(run_dir):
    out = run_dir
    summary = read(out / "rm" / "done.json")["summary"]
    assert summary["held_out_gold_accuracy"] > 0.6
    assert 0.0 <= summary["fact_accuracy"] <= 1.0 and 0.05 < summary["fact_chance"] < 0.2
    metrics = [json.loads(l) for l in open(out / "rm" / "metrics.jsonl")]
    assert {"loss", "accuracy", "chosen", "rejected"} <= set(metrics[0])


def test_dpo_raises_the_margin_on_its_training_pairs(run_dir):
    """A few DPO epochs from SFT on micro pairs: the implicit reward margin goes up."""
    from dpo import DPOConfig, precompute_logps, train_dpo
    out = run_dir
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    policy, _ = load_checkpoint(out / "sft", kind="gpt")
    reference, _ = load_checkpoint(out / "sft", kind="gpt")
    records = make_task(0, n_sft=0, n_pref=64)["pref"]
    train_dpo(policy, reference.eval(), tok, records, [], DPOConfig(epochs=4, batch_size=16, lr=1e-3, warmup=1),
              str(out / "dpo_test"), 32)
    pairs, _ = data.tokenize_pairs(tok, records, 96, 32)
    pc, pr = precompute_logps(policy, pairs, tok.pad_id)
    rc, rr = precompute_logps(reference, pairs, tok.pad_id)
    margin = 0.1 * ((pc - rc) - (pr - rr)).mean().item()
    assert margin > 0.5  # it starts at exactly 0: policy == reference


def test_ppo_raises_the_reward_model_score(run_dir):
    """A few PPO iterations from SFT on micro: the score PPO maximises (the reward-model score, with the
    fixed penalty for a response cut without eos) rises on fresh samples."""
    from evaluate import sample_responses
    from ppo import PPOConfig, train_ppo
    from reward import load_reward_model, score_ids
    out = run_dir
    torch.manual_seed(0)
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    policy, _ = load_checkpoint(out / "sft", kind="gpt")
    reference, _ = load_checkpoint(out / "sft", kind="gpt")
    reward_model = load_reward_model(str(out / "rm"))
    critic, _ = load_checkpoint(out / "rm", kind="scalar")
    prompts = [r["prompt"] for r in make_task(0, n_sft=0, n_pref=200)["pref"]]
    cfg = PPOConfig(iterations=10, rollouts=32, lr=3e-4, critic_lr=3e-4, sample_every=0, kl_coef=0.01)

    def mean_score():
        samples = sample_responses(policy, tok, prompts * 2, 32, seed=1)
        scores = score_ids(reward_model, *zip(*samples), tok.pad_id)
        eos = torch.tensor([tok.eos_id in r for _, r in samples])
        return torch.where(eos, scores, torch.full_like(scores, cfg.no_eos_score)).mean().item()

    before = mean_score()
    final = train_ppo(policy, reference.eval(), reward_model, critic, tok, prompts, cfg,
                      str(out / "ppo_test"), 32, gold=gold_reward)
    after = mean_score()
    assert after > before + 0.3, (before, after)
    assert {"score", "gold", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "explained_variance", "length"} <= set(final)


# ----------------------------------------------------------------------------- fixes found by review

def test_the_critic_starts_centred(run_dir):
    """The critic starts from the reward model's weights; the centring lives in the head's bias,
    so its reading at the eos of the demonstrations averages 0, like the scores PPO sees."""
    from reward import load_reward_model, rewards_at_last_token, score
    out = run_dir
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    demos = make_task(0, n_sft=600, n_pref=0)["sft"][:512]  # the micro run's centring set
    critic, _ = load_checkpoint(out / "rm", kind="scalar")
    prompts, responses = [p for p, _ in demos], [r for _, r in demos]
    scores = score(load_reward_model(str(out / "rm")), tok, prompts, responses, 32)
    assert abs(scores.mean().item()) < 1e-4
    batch = data.collate([tok.encode(p) for p in prompts], [data.encode_response(tok, r)[:32] for r in responses], tok.pad_id)
    with torch.no_grad():
        values = rewards_at_last_token(critic.eval()(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    # from magnitudes (tolerance.py): the micro run's float32 models, batched otherwise
    torch.testing.assert_close(values, scores, atol=network_atol(scores, MICRO_WIDEST, 2), rtol=0)


def test_scoring_uses_the_training_truncation(run_dir):
    """score() reads the reward where training read it: a long response is cut at max_response."""
    from reward import load_reward_model, reward_of, score
    out = run_dir
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    rm = load_reward_model(str(out / "rm"))
    record = {"prompt": make_task(0, n_sft=0, n_pref=1)["pref"][0]["prompt"], "rejected": " Hmm.",
              "chosen": " Happy to help!" + " I hope this helps, and let me know if you have any other questions at all." * 3}
    pairs, _ = data.tokenize_pairs(tok, [record], 96, 32)
    assert len(data.encode_response(tok, record["chosen"])) > 40  # longer than max_response and block // 2
    with torch.no_grad():
        trained = reward_of(rm, data.pair_batch(pairs, tok.pad_id))
    scored = score(rm, tok, [record["prompt"]] * 2, [record["chosen"], record["rejected"]], 32)
    torch.testing.assert_close(scored, trained, atol=network_atol(trained, MICRO_WIDEST, 2), rtol=0)  # from magnitudes


def test_evaluation_scores_the_sampled_ids_and_penalises_truncation(run_dir):
    """evaluate_policy scores the token ids it sampled, and a response cut at the length limit
    gets PPO's no_eos_score, not a score with an eos appended."""
    from evaluate import evaluate_policy, sample_responses
    from reward import load_reward_model, score_ids
    out = run_dir
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    policy, _ = load_checkpoint(out / "sft", kind="gpt")
    rm = load_reward_model(str(out / "rm"))
    prompts = make_task(0, n_sft=0, n_pref=0)["eval"][:40]
    judged = evaluate_policy(policy, policy, rm, tok, prompts, 16, seed=3, no_eos_score=-7.0)
    samples = sample_responses(policy, tok, prompts, 16, seed=3)
    finished = [tok.eos_id in r for _, r in samples]
    assert 0 < sum(finished) < len(finished)  # at 16 tokens, some responses are cut
    expected = score_ids(rm, *zip(*samples), tok.pad_id)
    atol = network_atol(expected, MICRO_WIDEST, 2)  # from magnitudes (tolerance.py)
    for got, want, done in zip(judged["rm_score"], expected.tolist(), finished):
        assert got == (pytest.approx(want, abs=atol) if done else -7.0)
    assert judged["kl_vs_sft"] == [0.0] * len(prompts)


def test_evaluation_averages_k_samples_per_prompt_and_adds_the_greedy_answer(run_dir):
    """With samples=K, a prompt's figure is the mean over its K samples (sample k of prompt i is
    draw k * N + i of one sampling pass); the greedy answer does not depend on the seed."""
    from evaluate import evaluate_policy, sample_responses
    from reward import load_reward_model
    from task import well_formed
    out = run_dir
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    policy, _ = load_checkpoint(out / "sft", kind="gpt")
    rm = load_reward_model(str(out / "rm"))
    task = {"gold": gold_reward, "well_formed": well_formed}
    prompts = make_task(0, n_sft=0, n_pref=0)["eval"][:20]
    judged = evaluate_policy(policy, policy, rm, tok, prompts, 32, seed=5, task=task, samples=3)
    texts = [tok.decode(r) for _, r in sample_responses(policy, tok, prompts * 3, 32, seed=5)]
    for i, p in enumerate(prompts):
        want = sum(gold_reward(p, texts[i + k * 20]) for k in range(3)) / 3
        assert judged["gold_reward"][i] == pytest.approx(want)
    assert judged["text"] == texts[:20]
    other = evaluate_policy(policy, policy, rm, tok, prompts, 32, seed=6, task=task, samples=1)
    assert other["greedy"] == judged["greedy"] and other["gold_reward"] != judged["gold_reward"]


def test_old_values_read_the_critic_in_eval_mode(run_dir):
    """The critic's old values come from eval mode (dropout off), as the reward and reference do."""
    from ppo import PPOConfig, old_logprobs, rollout
    from reward import load_reward_model
    out = run_dir
    tok = Tokenizer.load(str(out / "tokenizer" / "tokenizer.json"))
    policy, _ = load_checkpoint(out / "sft", kind="gpt")
    critic, _ = load_checkpoint(out / "rm", kind="scalar")
    critic.gpt.transformer.drop.p = 0.5  # dropout would make train-mode values random
    prompts = [tok.encode(p) for p in make_task(0, n_sft=0, n_pref=0)["eval"][:8]]
    rollouts = rollout(policy, load_reward_model(str(out / "rm")), prompts, tok, PPOConfig(), 16, "cpu", "fp32",
                       torch.Generator().manual_seed(0))
    old = old_logprobs(policy, policy, critic.train(), rollouts, torch.arange(8).chunk(2), PPOConfig(), "cpu", "fp32")
    with torch.no_grad():
        values = critic.eval()(rollouts.seq, rollouts.attn)[:, rollouts.prompt_len - 1:-1] * rollouts.mask
    torch.testing.assert_close(old["values"], values, atol=network_atol(values, MICRO_WIDEST, 2), rtol=0)  # from magnitudes


def test_transformers_loads_and_samples_the_exported_policy(run_dir):
    """--export-hf: transformers reads RUN/hf/mpo with its tokenizer, gives our logits, and samples."""
    transformers = pytest.importorskip("transformers")
    out = run_dir
    folder = out / "hf" / "mpo"
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    ours, _ = load_checkpoint(out / "ppo", kind="gpt")
    ids = tok("\n\nHuman: What color is the sky?\n\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ours.eval()(ids)
        assert (hf(ids).logits - logits).abs().max() < network_atol(logits, MICRO_WIDEST, 2)  # from magnitudes
        sample = hf.generate(ids, max_new_tokens=8, do_sample=True, pad_token_id=hf.config.eos_token_id)
    assert sample.shape[1] > ids.shape[1]


def test_transformers_reads_the_exported_reward_model(run_dir):
    """--export-hf: RUN/hf/reward_model is a GPT2ForSequenceClassification whose scores, read by
    transformers at the last token that is not padding, of a padded batch, are ours less the head's
    bias (transformers' score has none); --reward-model takes it back with the same differences."""
    transformers = pytest.importorskip("transformers")
    from plumbing.hf_reward import reward_model_at
    from reward import load_reward_model, score
    out, folder = run_dir, run_dir / "hf" / "reward_model"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 1
    tok = Tokenizer.load(str(folder / "tokenizer.json"))
    ours = load_reward_model(str(out / "rm"))
    task = make_task(0, n_sft=0, n_pref=40)
    prompts, responses = [r["prompt"] for r in task["pref"][:6]], [r["chosen"] for r in task["pref"][:6]]
    expected = score(ours, tok, prompts, responses, 32, "cpu", "fp32") - ours.head.bias.item()
    rows = [tok.encode(p) + data.encode_response(tok, r)[:32] for p, r in zip(prompts, responses)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])  # right-padded, as transformers reads
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(ids != tok.pad_id).long()).logits[:, 0]
    atol = network_atol(expected, MICRO_WIDEST, 2)  # from magnitudes (tolerance.py)
    torch.testing.assert_close(theirs, expected, atol=atol, rtol=0)
    back = score(reward_model_at(str(folder), tok), tok, prompts, responses, 32, "cpu", "fp32")
    torch.testing.assert_close(back - back[0], expected - expected[0], atol=2 * atol, rtol=0)  # two scores' errors


def test_the_export_says_when_transformers_reads_the_score_elsewhere(run_dir, tmp_path, capsys):
    """With the end-of-sequence token as padding, transformers reads a classifier's score one token
    before a final end of sequence: the export says so in one line (the built-in tokenizer has a
    padding token of its own, and says nothing)."""
    from plumbing.hf import export_hf
    copy = tmp_path / "copy"
    for stage in ("tokenizer", "sft", "rm", "dpo", "ppo"):
        shutil.copytree(run_dir / stage, copy / stage)
    export_hf(str(copy), {"mpo": "ppo"})
    assert "padding token is the end-of-sequence one" not in capsys.readouterr().out
    tok = Tokenizer.load(str(copy / "tokenizer" / "tokenizer.json"))
    Tokenizer(tok.tok, tok.eos_id, tok.eos_id).save(str(copy / "tokenizer" / "tokenizer.json"))
    export_hf(str(copy), {"mpo": "ppo"})
    assert "the padding token is the end-of-sequence one" in capsys.readouterr().out
    assert json.loads((copy / "hf" / "reward_model" / "config.json").read_text())["pad_token_id"] == tok.eos_id


def test_pictures_when_matplotlib_is_installed(run_dir):
    """The gap histogram, DPO's margin and PPO's score and KL curves as PNGs (matplotlib is optional)."""
    pytest.importorskip("matplotlib")
    out = run_dir
    for png in ("split/gaps.png", "dpo/curves.png", "ppo/curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
