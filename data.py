"""File loaders, the task of a run (built-in or from files), batching and masks.

Every preference record, built-in or loaded, is a dict {"prompt", "chosen", "rejected"} of
strings where chosen and rejected are the responses alone; built-in records also carry the
gold rewards of both responses ("gold_chosen", "gold_rejected").
"""
import hashlib
import json
import os
import random

import torch

from plumbing import chat
from plumbing import packing
from plumbing.files import DataError
from task import answer_choices, entropy_floor, gold_reward, make_task, prompt_kind, reference_scores, well_formed


# ----------------------------------------------------------------------------- preference files

def read_lines(path):
    """(line number, text) of a plain or gzip text file, its lines ending in LF or CRLF, with or without
    a byte-order mark; errors name the file (and the line)."""
    import gzip
    import zlib
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: not a complete gzip file ({e})") from None
    lines = raw.split(b"\n")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8-sig" if n == 1 else "utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start})") from None
        if text.strip():
            out.append((n, text))
    if not out:
        raise DataError(f"{path}: empty file")
    return out


def _field(row, key, where, allow_empty=False):
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, not {type(row[key]).__name__}")
    if not allow_empty and not row[key].strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return row[key]


HH_TURN = "\n\nAssistant:"


def _from_hh(row, where):
    """An HH-RLHF line: two whole dialogues that share everything up to the last Assistant turn."""
    chosen, rejected = _field(row, "chosen", where, True), _field(row, "rejected", where, True)
    if HH_TURN not in chosen:
        return "no Assistant turn"
    cut = chosen.rfind(HH_TURN) + len(HH_TURN)
    prompt = chosen[:cut]
    if rejected[:cut] != prompt or HH_TURN in rejected[cut:]:
        return "prompt differs"
    if not chosen[cut:].strip() or not rejected[cut:].strip():
        return "empty response"
    return {"prompt": prompt, "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _from_tldr(row, where):
    """A summarize-from-feedback comparison: a post, two summaries and the index of the better one."""
    for key in ("info", "summaries", "choice"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
    info, summaries, choice = row["info"], row["summaries"], row["choice"]
    if not isinstance(info, dict):
        raise DataError(f"{where}: field 'info' must be an object")
    if not (isinstance(summaries, list) and len(summaries) == 2 and all(isinstance(s, dict) for s in summaries)):
        raise DataError(f"{where}: field 'summaries' must be a list of two objects")
    if type(choice) is not int or choice not in (0, 1):
        raise DataError(f"{where}: field 'choice' must be 0 or 1, not {choice!r}")
    if "post" not in info and "article" in info:
        return "not a reddit post"  # the CNN/DM rows of the validation split
    post = {k: _field(info, k, f"{where}: info", k == "title") for k in ("subreddit", "title", "post")}
    texts = [_field(s, "text", f"{where}: summaries[{i}]") for i, s in enumerate(summaries)]
    prompt = f"SUBREDDIT: r/{post['subreddit']}\nTITLE: {post['title']}\nPOST: {post['post']}\nTL;DR:"
    return {"prompt": prompt, "chosen": " " + texts[choice].strip(), "rejected": " " + texts[1 - choice].strip()}


def _from_jsonl(row, where):
    return {"prompt": _field(row, "prompt", where), "chosen": _field(row, "chosen", where),
            "rejected": _field(row, "rejected", where)}


def _chat(fn, *args):
    """plumbing/chat.py's functions, their mistakes as DataError (one line, exit status 2)."""
    try:
        return fn(*args)
    except chat.ChatError as e:
        raise DataError(str(e)) from None


def _from_chat(row, where):
    """A line of TRL's conversational format: {"prompt": messages, "chosen": answer, "rejected": answer}."""
    return dict(zip(("prompt", "chosen", "rejected"), _chat(chat.preference, row, where)))


FORMATS = {"hh": _from_hh, "tldr": _from_tldr, "jsonl": _from_jsonl, "chat": _from_chat}


def detect_format(row):
    """chat (conversations: lists of messages), jsonl, tldr or hh from the fields of one line, or None."""
    if any(isinstance(row.get(key), list) for key in ("prompt", "chosen", "rejected")):
        return "chat"
    for name, key in (("jsonl", "prompt"), ("tldr", "summaries"), ("hh", "chosen")):
        if key in row:
            return name
    return None


def load_preferences(path, format="auto", log=print, template=None):
    """A preference file -> [{"prompt", "chosen", "rejected", "line"}], responses alone; a
    conversation's (and an HH-RLHF dialogue's) also with "messages", its prompt's (conversations).

    Formats: hh (Anthropic HH-RLHF), tldr (OpenAI summarize-from-feedback comparisons), jsonl
    ({"prompt", "chosen", "rejected"}, as in TRL), chat (TRL's conversational form), or auto (told
    apart by the first line). Plain or gzip. Conversations, and HH dialogues given a chat template,
    are rendered with `template` (a chat.Template; None: the HH text form) into the texts. Pairs whose two responses are identical, and HH lines whose dialogues differ before the
    last Assistant turn or end in an empty turn, are skipped and counted. Any other mistake raises
    DataError naming the file, the line and the field.
    """
    if format not in ("auto", *FORMATS):
        raise DataError(f"unknown format {format!r}: choose from auto, {', '.join(FORMATS)}")
    records, skipped = [], {}
    for n, text in read_lines(path):
        where, row = f"{path}:{n}", _json(n, text, path)
        if format == "auto":
            format = detect_format(row)
            if format is None:
                raise DataError(f"{where}: cannot tell the format (fields {sorted(row)}); " + (
                    "conversations to imitate ('messages') are --sft-data" if "messages" in row else "give --format"))
            log(f"{path}: format {format} (from its first line)")
        try:
            record = FORMATS[format](row, where)
            if isinstance(record, dict) and (format == "chat" or format == "hh" and template):
                record = _rendered(record, template, where)
            elif isinstance(record, dict) and format == "hh":  # its dialogue as messages too (conversations)
                record = {**record, "messages": chat.hh_messages(record["prompt"])}
        except DataError as e:
            seen = detect_format(row)
            raise DataError(f"{e} (reading as {format}{f'; the line looks like {seen}' if seen and seen != format else ''})") from None
        if isinstance(record, dict) and record["chosen"] == record["rejected"]:
            record = "chosen equals rejected"
        if isinstance(record, str):
            skipped[record] = skipped.get(record, 0) + 1
            continue
        records.append({**record, "line": n})
    if skipped:
        log(f"{path}: skipped " + ", ".join(f"{k} lines: {v}" for k, v in sorted(skipped.items())))
    if not records:
        raise DataError(f"{path}: no usable preference pairs (every line skipped; is --format {format} right?)")
    return records


def _rendered(record, template, where):
    """A record of messages (an HH one made messages) as the texts every stage reads (chat.rendered)."""
    if isinstance(record["prompt"], str):  # HH-RLHF: its dialogue as messages, each answer less its space
        record = {"prompt": chat.hh_messages(record["prompt"]), "chosen": record["chosen"].removeprefix(" "),
                  "rejected": record["rejected"].removeprefix(" ")}
    prompt, (chosen, rejected) = _chat(chat.rendered, template, record["prompt"],
                                       [record["chosen"], record["rejected"]], where)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "messages": record["prompt"]}


def load_demonstrations(path, format="auto", log=print, template=None):
    """(prompt, response) pairs: {"prompt", "response"} lines, {"messages"} conversations (one pair
    per assistant turn, rendered with `template`), or the chosen side of a preference file."""
    lines = read_lines(path)
    first = _json(*lines[0], path)
    if "messages" in first or isinstance(first.get("completion"), list):
        return [(prompt, answer) for n, text in lines
                for messages, said in _chat(chat.demonstrations, _json(n, text, path), f"{path}:{n}")
                for prompt, (answer,) in [_chat(chat.rendered, template, messages, [said], f"{path}:{n}")]]
    if "response" not in first:
        return [(r["prompt"], r["chosen"]) for r in load_preferences(path, format, log, template)]
    # an empty prompt is refused: the first response token would be scored from padding before it
    return [(_field(row, "prompt", f"{path}:{n}"), _field(row, "response", f"{path}:{n}"))
            for n, row in ((n, _json(n, text, path)) for n, text in lines)]


def _json(n, text, path):
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{n}: expected a JSON object, not {type(row).__name__}")
    return row


# ----------------------------------------------------------------------------- the task of a run

def load_task(seed, tau, log=print, *, data="", format="auto", eval_data="", sft_data="", eval_prompts=0,
              eval_split="test", n_sft=4000, n_pref=2000, annotator_bias=0.0, bias_kind="longer", on_policy_pairs=False,
              label_flips=0.0, judge_fraction=0.2, chat_template="auto", tokenizer=None):
    """The built-in task (its settings: n_sft to on_policy_pairs, tau the label noise), or the
    records of the preference file `data` with a held-out part (or the file eval_data) and the
    judge's part: a seeded share judge_fraction of the remaining pairs, "judge", that trains the
    evaluation's judge alone (stages.judge_stage); "pref", the pairs the reward model, the split,
    DPO and PPO use, and SFT's default demonstrations are the rest. Each setting is the flag of
    the same name (train.py). Conversations (and HH-RLHF dialogues) are rendered with the chat
    template chat_template chooses (chat.choose) beside the tokenizer.json at `tokenizer` (--init's):
    task["template"], None where no template is used."""
    if not data:
        task = make_task(seed, n_sft, n_pref, tau, annotator_bias, bias_kind, on_policy_pairs, label_flips)
        if eval_split == "valid":  # choosing settings: the test prompts stay unseen, held-out pairs too
            task["eval"], task["held_out"] = task["valid"], task["held_out_valid"]
        if eval_prompts:
            task["eval"] = task["eval"][:eval_prompts]
        return {**task, "gold": gold_reward, "well_formed": well_formed, "reference": reference_scores,
                "entropy_floor": entropy_floor, "kind": prompt_kind, "answers": answer_choices,
                "key": {"seed": seed, "task": {"n_sft": n_sft, "n_pref": n_pref,
                                               **({"bias": annotator_bias, "bias_kind": bias_kind}
                                                  if annotator_bias else {}),
                                               **({"on_policy": True} if on_policy_pairs else {}),
                                               **({"flips": label_flips} if label_flips else {})}},
                "judge": None, "conversations": hh_conversations(task)}
    n, text = read_lines(data)[0]
    template, note = _chat(chat.choose, chat_template, tokenizer, data,
                           detect_format(_json(n, text, data)) if format == "auto" else format)
    if note:
        log(note)
    records = load_preferences(data, format, log, template)
    rng = random.Random(seed)
    if eval_data:
        held_out = load_preferences(eval_data, format, log, template)
    else:  # a seeded tenth of the file, at most 1000 pairs, never trained on
        order = list(range(len(records)))
        rng.shuffle(order)
        n = max(1, min(1000, len(records) // 10))
        held_out, records = [records[i] for i in order[:n]], [records[i] for i in sorted(order[n:])]
        if not records:
            raise DataError(f"{data}: too few pairs to hold some out; give --eval-data")
    # the judge's pairs: seen by the judge alone, never by the tokenizer, SFT, the reward model,
    # the split, DPO or PPO (each record keeps its "line" in the file: disjoint by line)
    order = list(range(len(records)))
    rng.shuffle(order)
    n = max(1, round(judge_fraction * len(records)))
    if len(records) - n < 2:
        raise DataError(f"{data}: {len(records)} pairs {'besides' if eval_data else 'after'} the held-out part, too "
                        f"few to hold out {judge_fraction:g} of them for the judge and train on at least 2; give "
                        f"more pairs")
    judge, records = [records[i] for i in sorted(order[:n])], [records[i] for i in sorted(order[n:])]
    demos = (load_demonstrations(sft_data, format, log, template) if sft_data
             else [(r["prompt"], r["chosen"]) for r in records])
    prompts = list(dict.fromkeys(r["prompt"] for r in held_out))[:eval_prompts or 256]
    files = [f for f in (data, eval_data, sft_data) if f]
    key = {"seed": seed, "data": {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files},
           "judge_fraction": judge_fraction, **({"chat_template": template.sha256()} if template else {})}
    return {"sft": demos, "pref": records, "held_out": held_out, "judge": judge, "eval": prompts, "gold": None,
            "well_formed": None, "reference": None, "entropy_floor": None, "kind": None, "answers": None,
            "key": key, "template": template, "conversations": conversations(records + held_out + judge)}


def hh_conversations(task):
    """The built-in task's conversations (its prompts are HH-RLHF dialogues), as conversations gives
    a file's."""
    prompts = dict.fromkeys([r["prompt"] for r in task["pref"] + task["held_out"]] + task["eval"])
    return {p: chat.hh_messages(p) for p in prompts}


def conversations(records):
    """{a rendered prompt: its messages} of the records that have them (load_preferences), so that a
    reward model of another tokenizer can render them anew in its own chat template (hf_reward)."""
    return {r["prompt"]: r["messages"] for r in records if "messages" in r}


def report_long_prompts(task, tokenizer, block_size, max_new_tokens, path, log=print):
    """One line for the prompts that do not fit the context: they are cut from the left."""
    room = block_size - max_new_tokens
    long = [(r["line"], n) for r in task["pref"] for n in [len(tokenizer.encode(r["prompt"]))] if n > room]
    if long:
        log(f"{path}:{long[0][0]}: field 'prompt' has {long[0][1]} tokens, more than the {room} the "
                   f"context leaves; {len(long)} such prompts are cut from the left, keeping the end")


# ----------------------------------------------------------------------------- batching

def left_pad(rows, pad_id):
    """Lists of ids -> (ids (B, L), mask (B, L)), padded on the left (prompts)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
    return ids, mask


def collate(prompts, responses, pad_id):
    """Prompt ids left-padded, then response ids right-padded, in one row per pair.

    Returns input_ids, attention_mask and response_mask, all (B, P + R): response_mask is 1 on
    the response tokens, the only ones a log-prob, a loss or a reward ever counts.
    """
    p_ids, p_mask = left_pad(prompts, pad_id)
    R = max(len(r) for r in responses)
    r_ids = torch.full((len(responses), R), pad_id, dtype=torch.long)
    r_mask = torch.zeros(len(responses), R, dtype=torch.long)
    for i, r in enumerate(responses):
        r_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        r_mask[i, :len(r)] = 1
    return {"input_ids": torch.cat([p_ids, r_ids], 1),
            "attention_mask": torch.cat([p_mask, r_mask], 1),
            "response_mask": torch.cat([torch.zeros_like(p_mask), r_mask], 1)}


def to_device(batch, device):
    """A collated batch, made on the host, on `device`, with what its forward passes would otherwise
    read back from the device found here, where the masks are: "plan", its packing
    (packing.plan), and "response_at", the flat positions of the response tokens that have a token
    before them (model.response_token_logps). On CUDA the copies start from pinned memory and do
    not block the host."""
    out = {k: packing.to_device(v, device) for k, v in batch.items()}
    if batch.get("attention_mask") is not None:
        out["plan"] = packing.plan(batch["attention_mask"], device).to(device)
    if "response_mask" in batch:
        scored = batch["response_mask"].bool().clone()
        scored[:, 0] = False  # the first token of a row has no logits before it
        out["response_at"] = packing.to_device(packing.positions(scored), device)
    return out


def encode_response(tokenizer, text):
    return tokenizer.encode(text) + [tokenizer.eos_id]


def tokenize_pairs(tokenizer, records, block_size, max_response):
    """Preference records -> [(prompt_ids, chosen_ids, rejected_ids)] and how many prompts were cut.

    Responses end with eos and keep at most max_response tokens; a prompt too long for the
    context loses tokens from the left, keeping the end of the dialogue.
    """
    out, cut = [], 0
    for r in records:
        chosen = encode_response(tokenizer, r["chosen"])[:max_response]
        rejected = encode_response(tokenizer, r["rejected"])[:max_response]
        prompt = tokenizer.encode(r["prompt"])
        room = block_size - max(len(chosen), len(rejected))
        if len(prompt) > room:
            prompt, cut = prompt[len(prompt) - room:], cut + 1
        out.append((prompt, chosen, rejected))
    return out, cut


def pair_batch(pairs, pad_id):
    """[(prompt, chosen, rejected)] -> one batch of 2B rows: the B chosen rows, then the B rejected."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    return collate(prompts, responses, pad_id)


def batches(n, batch_size, generator=None, shuffle=True):
    """Index lists covering range(n) once, shuffled with the given torch.Generator."""
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
