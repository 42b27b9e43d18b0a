"""Preference-file loaders (hh, tldr, jsonl, gzip, auto) and the errors a user's mistakes get."""
import gzip
import json
import os

import pytest

import data
from plumbing import files

HH_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf",
                       "harmless-base-test.jsonl.gz")


def write(path, lines, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def hh(prompt_c, resp_c, prompt_r=None, resp_r=" No."):
    return {"chosen": prompt_c + resp_c, "rejected": (prompt_r or prompt_c) + resp_r}


DIALOGUE = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"


def test_hh_prompt_is_everything_up_to_the_last_assistant_turn(tmp_path):
    lines = [hh(DIALOGUE, " 4."),
             hh(DIALOGUE, " 4.", prompt_r=DIALOGUE.replace("2+2", "3+3")),  # prompts differ: skipped
             hh(DIALOGUE, " "),                                            # empty response: skipped
             hh(DIALOGUE, " Same.", resp_r=" Same.")]                      # identical: skipped
    logs = []
    records = data.load_preferences(write(tmp_path / "hh.jsonl", lines), "hh", logs.append)
    assert records == [{"prompt": DIALOGUE, "chosen": " 4.", "rejected": " No.", "line": 1,
                        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                     {"role": "user", "content": "What is 2+2?"}]}]  # for a reward model's template
    assert "empty response lines: 1" in logs[-1] and "prompt differs lines: 1" in logs[-1]
    assert "chosen equals rejected lines: 1" in logs[-1]


def test_tldr_prompt_and_the_chosen_summary(tmp_path):
    line = {"info": {"id": "x", "post": "My cat ate my homework.", "title": "Cat", "subreddit": "pets"},
            "summaries": [{"text": "cat ate it", "policy": "a"}, {"text": " homework gone", "policy": "b"}],
            "choice": 1, "worker": "w"}
    (r,) = data.load_preferences(write(tmp_path / "t.jsonl", [line]), "tldr", lambda m: None)
    assert r["prompt"] == "SUBREDDIT: r/pets\nTITLE: Cat\nPOST: My cat ate my homework.\nTL;DR:"
    assert (r["chosen"], r["rejected"]) == (" homework gone", " cat ate it")


def test_tldr_skips_cnn_dm_rows_and_checks_choice(tmp_path):
    reddit = {"info": {"post": "p", "title": "t", "subreddit": "s"},
              "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}
    news = {"info": {"article": "a news story", "site": "cnn"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 1}
    logs = []
    records = data.load_preferences(write(tmp_path / "t.jsonl", [reddit, news]), "tldr", logs.append)
    assert len(records) == 1 and "not a reddit post lines: 1" in logs[-1]
    with pytest.raises(files.DataError, match=r":1: field 'choice' must be 0 or 1, not 1.0"):
        data.load_preferences(write(tmp_path / "c.jsonl", [{**reddit, "choice": 1.0}]), "tldr")


def test_hh_without_assistant_turns_says_so(tmp_path):
    lines = [{"chosen": "a plain answer", "rejected": "another"}] * 2
    logs = []
    with pytest.raises(files.DataError, match="no usable preference pairs .* is --format hh right"):
        data.load_preferences(write(tmp_path / "h.jsonl", lines), "auto", logs.append)
    assert "no Assistant turn lines: 2" in logs[-1]


def test_jsonl_gzip_and_auto_detection(tmp_path):
    rows = [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"}]
    logs = []
    path = write(tmp_path / "p.jsonl.gz", rows, gzip.open)
    assert data.load_preferences(path, "auto", logs.append) == [{**rows[0], "line": 1}]
    assert "format jsonl" in logs[0]
    for line, fmt in ((hh(DIALOGUE, " 4."), "hh"),
                      ({"info": {}, "summaries": [], "choice": 0}, "tldr")):
        assert data.detect_format(line) == fmt


def test_demonstrations_from_prompt_response_lines_or_chosen(tmp_path):
    demos = write(tmp_path / "d.jsonl", [{"prompt": "Q", "response": " A"}])
    assert data.load_demonstrations(demos) == [("Q", " A")]
    prefs = write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " A", "rejected": " B"}])
    assert data.load_demonstrations(prefs, log=lambda m: None) == [("Q", " A")]


def test_an_empty_prompt_in_demonstrations_is_one_clear_error(tmp_path):
    """With no prompt, nothing comes before a row's first response token: it would be scored from
    padding (packed: a copy of the token itself). So the line is refused, naming file and line."""
    demos = write(tmp_path / "d.jsonl", [{"prompt": "Q", "response": " A"}, {"prompt": " ", "response": " B"}])
    with pytest.raises(files.DataError, match=r"d.jsonl:2: field 'prompt' is empty"):
        data.load_demonstrations(demos)


@pytest.mark.skipif(not os.path.exists(HH_FILE), reason="the HH-RLHF file beside the project is absent")
def test_real_hh_file_rebuilds_every_dialogue():
    logs = []
    records = data.load_preferences(HH_FILE, "auto", logs.append)
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        originals = [json.loads(line) for line in f]
    for r in records:
        original = originals[r["line"] - 1]
        assert r["prompt"] + r["chosen"] == original["chosen"]
        assert r["prompt"] + r["rejected"] == original["rejected"]
    skipped = sum(int(part.rsplit(": ", 1)[1]) for part in logs[-1].split("skipped ")[1].split(", "))
    assert 0 < skipped < 50 and len(records) + skipped == len(originals)
