"""Chat templates and conversations (plumbing/chat.py): three template families rendered as transformers'
apply_chat_template renders them, byte for byte and token for token; the scored sequence holds one
system prompt and one end of turn; the HH-RLHF text form without a template; bad conversations and
templates stop with one line naming the file, the line and the field."""
import json
import os

import pytest

from plumbing import chat
import data
from plumbing.tokenizer import Tokenizer
from plumbing import files

transformers = pytest.importorskip("transformers")

# the pre-tokenizer pattern of Qwen2's and Llama 3's tokenizer.json: newlines split from the text after them
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>", "</s>"]

# ChatML as Qwen2.5 writes it, with its default system prompt where the data gives none
QWEN = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# Llama 3's headers: bos_token, a dated system header (strftime_now), trimmed contents, <|eot_id|>
LLAMA3 = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + strftime_now('%d %b %Y') + '\n\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# Zephyr's: a turn per role, each closed by eos_token, the system's given in the data; the newline
# after each {{ }} is the template's text
ZEPHYR = r"""{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# family: (template, tokenizer_config.json's special tokens, what the whole conversation's render has
# after the scored end of turn)
FAMILIES = {
    "chatml-qwen2.5": (QWEN, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "\n"),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, ""),
    "zephyr-system": (ZEPHYR, {"eos_token": "</s>", "pad_token": "<|pad|>"}, "\n"),
}
SYSTEM = [{"role": "system", "content": "You are terse. Answer in one sentence."}]
CONVERSATIONS = [  # (prompt, answer)
    ([{"role": "user", "content": "What color is a banana?"}], "A banana is yellow."),
    ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "What is 2+2?"}], " 4, of course. "),
    (SYSTEM + [{"role": "user", "content": "Name a red fruit."}], "An apple.\n\nOr a cherry."),
]


def tiny_tokenizer(more=()):
    """A byte-level BPE with Qwen2's pre-tokenizer and every family's special tokens, trained on the
    test conversations and the texts `more`."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for prompt, answer in CONVERSATIONS for m in prompt] + [a for _, a in CONVERSATIONS]
    texts += ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "system user assistant\n\n"]
    tok.train_from_iterator(texts * 20 + list(more), trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def family_folder(folder, family, more=()):
    """A tokenizer folder as a Hugging Face instruct model's: tokenizer.json, and tokenizer_config.json
    with its special tokens and chat template."""
    source, tokens, _ = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(more).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": source, **tokens}))
    return str(folder / "tokenizer.json")


def oracle(path):
    """transformers' tokenizer of the folder: the test's reference, never the project's."""
    return transformers.PreTrainedTokenizerFast.from_pretrained(os.path.dirname(path))


def ids_of(encoded):
    return encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_equals_transformers_byte_for_byte_and_token_for_token(tmp_path, family):
    """The prompt (with the generation prompt) and the whole conversation (with and without it) render
    as apply_chat_template renders them; the scored ids, the prompt's then the answer's and one end of
    turn, are the whole conversation's ids up to the end of turn, and what follows it is the family's
    separator alone: one system prompt, one end of turn."""
    path = family_folder(tmp_path, family)
    template = chat.load("auto", path)
    hf = oracle(path)
    tokenizer = Tokenizer.load(path).for_chat(template)
    tail = FAMILIES[family][2]
    assert template.ending == template.end_of_turn + tail
    for prompt, answer in CONVERSATIONS:
        whole = prompt + [{"role": "assistant", "content": answer}]
        for conversation in (prompt, whole):
            for generation in (False, True):
                assert template.render(conversation, generation) == hf.apply_chat_template(
                    conversation, tokenize=False, add_generation_prompt=generation)
        head, (text,) = chat.rendered(template, prompt, [answer], "x")
        assert head == hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(head)
        assert prompt_ids == ids_of(hf.apply_chat_template(prompt, add_generation_prompt=True))
        response = data.encode_response(tokenizer, text)
        full = ids_of(hf.apply_chat_template(whole))
        assert prompt_ids + response == full[:len(prompt_ids) + len(response)]
        assert hf.decode(full[len(prompt_ids) + len(response):]) == tail  # not scored: never generated
        eot = tokenizer.eos_id
        assert response[-1] == eot and response.count(eot) == 1 and eot not in prompt_ids[-3:]
        scored = hf.decode(prompt_ids + response)
        given = prompt[0]["role"] == "system"
        assert scored.count(SYSTEM[0]["content"]) == given
        assert scored.count("You are Qwen") == (family == "chatml-qwen2.5" and not given)
        assert sum(scored.count(header) for header in ("<|im_start|>system", "<|start_header_id|>system",
                                                       "<|system|>")) <= 1


def test_the_families_show_one_rendered_prompt_and_answer(tmp_path):
    """What each family scores, for the closing note: the prompt and the answer of one conversation."""
    for family in FAMILIES:
        template = chat.load("auto", family_folder(tmp_path / family, family))
        prompt, answer = CONVERSATIONS[1]
        head, (text,) = chat.rendered(template, prompt, [answer], "x")
        print(f"{family}: prompt {head!r}\n  answer {text!r} + {template.end_of_turn!r}")
        assert text.strip() == "4, of course." and head.endswith(("assistant\n", "<|end_header_id|>\n\n",
                                                                  "<|assistant|>\n"))


def test_without_a_template_conversations_take_the_hh_text_form():
    head, answers = chat.rendered(None, CONVERSATIONS[1][0], ["4.", "5."], "x")
    assert head == "\n\nHuman: Hi!\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant:"
    assert answers == [" 4.", " 5."]
    assert chat.hh_messages(head) == CONVERSATIONS[1][0]


def test_sampling_stops_at_the_end_of_turn_and_at_the_end_of_sequence(tmp_path):
    """A chat run's tokenizer: a response ends with the end of turn, and sampling stops at it and at
    the folder's end of sequence; saved and loaded, it keeps both and the template."""
    path = family_folder(tmp_path, "llama3")
    tokenizer = Tokenizer.load(path).for_chat(chat.load("auto", path))
    eot, eos = (tokenizer.tok.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    assert tokenizer.eos_id == eot and tokenizer.stop_ids == [eot, eos]
    (tmp_path / "run").mkdir()
    tokenizer.save(str(tmp_path / "run" / "tokenizer.json"))
    again = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert (again.eos_id, again.stop_ids, again.chat["chat_template"]) == (eot, [eot, eos], LLAMA3)
    import torch
    from sampling import response_mask
    tokens = torch.tensor([[100, eot, 101, 101], [100, 102, eos, 101], [100, 101, 102, 103]])
    assert response_mask(tokens, again.stop_ids, 0).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


# ----------------------------------------------------------------------------- a reward model of its own

@pytest.mark.parametrize("policy_family", ["llama3", None], ids=["llama3-policy", "hh-text-policy"])
def test_a_reward_model_of_another_tokenizer_renders_each_conversation_in_its_own_template(tmp_path, policy_family):
    """--reward-model whose tokenizer is not the policy's and whose folder has a chat template (ChatML
    here): each row the policy wrote, in its own template (Llama 3) or in the HH-RLHF text form, is
    scored as transformers scores the conversation rendered by the reward model's template, as TRL
    renders it for such a reward model: whole, with the answer and its end of turn, where the policy
    ended the answer; the prompt with the generation prompt and the answer after it, where the answer
    was cut at the length limit; and so for a prompt cut from the left. A row whose prompt is no known
    conversation is its text re-tokenised, as before."""
    import torch
    from plumbing.hf_reward import reward_model_at
    from test_hf_reward import WIDEST, hf_classifier, padded
    from tolerance import network_atol
    folder = tmp_path / "rm"
    rm_tok = Tokenizer.load(family_folder(folder, "chatml-qwen2.5", ["a reward model's own vocabulary"] * 50))
    hf = hf_classifier("qwen2", vocab_size=rm_tok.vocab_size, pad=rm_tok.pad_id, max_position_embeddings=256)
    hf.save_pretrained(folder)
    oracle_tok = oracle(str(folder / "tokenizer.json"))
    if policy_family:
        path = family_folder(tmp_path / "policy", policy_family)
        template = chat.load("auto", path)
        policy = Tokenizer.load(path).for_chat(template)
    else:  # no template: the HH-RLHF text form
        loaded = Tokenizer.load(family_folder(tmp_path / "policy", "zephyr-system"))
        template, policy = None, Tokenizer(loaded.tok, loaded.eos_id, loaded.pad_id)  # as stages.tokenizer_stage keeps it
    assert policy.tok.to_str() != rm_tok.tok.to_str()
    (p0, a0), (p1, a1) = CONVERSATIONS[2], CONVERSATIONS[1]
    (head0, (text0,)), (head1, (text1,)) = (chat.rendered(template, p, [a], "x") for p, a in ((p0, a0), (p1, a1)))
    conversations = {head0: p0, head1: p1}
    rm = reward_model_at(str(folder), policy, conversations=conversations)
    ended, cut = policy.encode(head0) + data.encode_response(policy, text0), policy.encode(head1) + policy.encode(text1)
    left_cut = policy.encode(head1)[5:] + data.encode_response(policy, text1)
    unknown = policy.encode("\n\nHuman: Who?\n\nAssistant:") + data.encode_response(policy, " Me.")
    ids, mask = padded([ended, cut, left_cut, unknown], left=True)
    render = lambda conversation, generation: oracle_tok.apply_chat_template(conversation, tokenize=False,
                                                                              add_generation_prompt=generation)
    answer = lambda a: [{"role": "assistant", "content": a.removeprefix(" ") if template is None else a}]
    texts = [render(p0 + answer(text0), False), render(p1, True) + answer(text1)[0]["content"],
             render(p1 + answer(text1), False)]
    expected = [oracle_tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    expected.append(rm_tok.encode("\n\nHuman: Who?\n\nAssistant: Me.") + [rm_tok.eos_id])  # re-tokenised
    with torch.no_grad():
        want = torch.stack([hf(torch.tensor([e])).logits[0, 0] for e in expected])
        got = rm(ids, mask)[:, -1]
    assert texts[0].count("<|im_start|>system") == 1 and texts[0].endswith("<|im_end|>\n")
    assert (got - want).abs().max() < network_atol(want, WIDEST, 2)  # from magnitudes (tolerance.py)
    assert want.std() > 0.05  # rows scored apart: a wrong rendering shows


# ----------------------------------------------------------------------------- bad input

def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


USER = {"role": "user", "content": "Hi?"}
GOOD = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}
BAD = [  # (the second line, what the one line says after FILE:2:)
    ({**GOOD, "prompt": [{"role": "bot", "content": "Hi?"}]}, "field 'prompt': message 0 has role 'bot'"),
    ({**GOOD, "chosen": [{"role": "assistant", "content": ["Hello."]}]},
     "field 'chosen': message 0's content must be a string, not list"),
    ({**GOOD, "rejected": []}, "field 'rejected' is an empty conversation"),
    ({**GOOD, "chosen": [{"role": "user", "content": "Hello."}]},
     "field 'chosen': the last turn is the user's, not the assistant's"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "b"}]},
     "fields 'chosen' and 'rejected' differ at message 0"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "field 'chosen' holds the answer alone: no prompt before it"),
]


@pytest.mark.parametrize("line, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_a_bad_conversation_is_one_line_naming_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "pairs.jsonl", [GOOD, line])
    with pytest.raises(files.DataError) as info:
        data.load_preferences(path, "auto", lambda m: None)
    assert str(info.value).startswith(f"{path}:2: {message}") and "\n" not in str(info.value)


def test_a_template_that_fails_to_render_names_the_line(tmp_path):
    """A template that refuses a system message (raise_exception, as Gemma's does): the line that has one."""
    path = family_folder(tmp_path, "chatml-qwen2.5")
    refuses = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": refuses + QWEN, "eos_token": "<|im_end|>"}))
    rows = write(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "prompt": SYSTEM + [USER]}])
    template = chat.load("auto", path)
    with pytest.raises(files.DataError, match=r"pairs.jsonl:2: .*fails to render: System role not supported"):
        data.load_preferences(rows, "auto", lambda m: None, template)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(chat.ChatError, match=r"broken.jinja: not a Jinja template"):
        chat.load(str(tmp_path / "broken.jinja"), path)


# ----------------------------------------------------------------------------- files

HH_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
IMPLICIT = {"chosen": [USER, {"role": "assistant", "content": "Hello."}],
            "rejected": [USER, {"role": "assistant", "content": "Go away."}]}


def test_explicit_and_implicit_prompts_and_demonstrations(tmp_path):
    """TRL's two preference forms read as the same pair, auto-detected; a {messages} demonstration
    gives a pair per assistant turn, each with the conversation before it."""
    logs = []
    explicit = data.load_preferences(write(tmp_path / "e.jsonl", [GOOD]), "auto", logs.append)
    implicit = data.load_preferences(write(tmp_path / "i.jsonl", [IMPLICIT]), "auto", logs.append)
    assert explicit == implicit == [{"prompt": "\n\nHuman: Hi?\n\nAssistant:", "chosen": " Hello.",
                                     "rejected": " Go away.", "messages": [USER], "line": 1}]
    assert "format chat (from its first line)" in logs[0]
    two = {"messages": [USER, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"},
                        {"role": "assistant", "content": "Bye."}]}
    demos = data.load_demonstrations(write(tmp_path / "d.jsonl", [two]))
    assert demos == [("\n\nHuman: Hi?\n\nAssistant:", " Hello."),
                     ("\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: And?\n\nAssistant:", " Bye.")]
    with pytest.raises(files.DataError, match=r"d.jsonl:1: cannot tell the format .* are --sft-data"):
        data.load_preferences(str(tmp_path / "d.jsonl"))


def hh_lines(n):
    import gzip
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def as_conversations(rows, keep, explicit):
    """HH-RLHF lines in TRL's conversational form, by hand: implicit (whole conversations) or explicit."""
    out = []
    for row in (rows[n - 1] for n in keep):
        chosen, rejected = chat.hh_messages(row["chosen"]), chat.hh_messages(row["rejected"])
        out.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]} if explicit
                   else {"chosen": chosen, "rejected": rejected})
    return out


@pytest.mark.skipif(not os.path.exists(HH_FILE), reason="the HH-RLHF file beside the project is absent")
@pytest.mark.parametrize("explicit", [False, True])
def test_hh_rlhf_lines_as_conversations_give_the_same_pairs(tmp_path, explicit):
    """40 lines of HH-RLHF's harmless-base test file made conversations: without a template the same
    pairs as the HH reader's, text for text; with one, the same as the HH reader's dialogues made messages."""
    rows = hh_lines(40)
    plain = data.load_preferences(write(tmp_path / "hh.jsonl", rows), "hh", lambda m: None)
    keep = [r["line"] for r in plain]
    path = write(tmp_path / "chat.jsonl", as_conversations(rows, keep, explicit))
    converted = data.load_preferences(path, "auto", lambda m: None)
    assert len(plain) > 30 and [{**r, "line": keep[r["line"] - 1]} for r in converted] == plain
    template = chat.load("auto", family_folder(tmp_path / "qwen", "chatml-qwen2.5"))
    kept = write(tmp_path / "kept.jsonl", [rows[n - 1] for n in keep])
    rendered = data.load_preferences(kept, "hh", lambda m: None, template)
    assert data.load_preferences(path, "auto", lambda m: None, template) == rendered
    assert rendered[0]["prompt"].startswith("<|im_start|>system\n") and rendered[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert rendered[0]["chosen"] == json.loads(json.dumps(rows[keep[0] - 1]))["chosen"].rsplit("\n\nAssistant: ", 1)[1]


# ----------------------------------------------------------------------------- a whole run

def test_micro_pipeline_from_an_instruct_qwen2_folder_over_conversations(tmp_path):
    """A tiny random Qwen2 folder with a ChatML template, over TRL's conversational pairs (the built-in
    task's, made messages): every stage runs on the rendered conversations; the samples show the
    template's markers and end at the end of turn; the exported folder keeps the template, which
    transformers renders as the run did, and the end-of-turn id among its generation config's."""
    from cli import run_train
    from task import make_task
    init, out = tmp_path / "qwen2", tmp_path / "run"
    pairs = make_task(0, n_sft=0, n_pref=96)["pref"]
    path = family_folder(init, "chatml-qwen2.5", [r["prompt"] + r["chosen"] for r in pairs])
    tok = Tokenizer.load(path)
    im_end = tok.tok.token_to_id("<|im_end|>")
    config = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=192,
                                      tie_word_embeddings=True, bos_token_id=None,
                                      eos_token_id=[im_end, tok.tok.token_to_id("<|endoftext|>")])  # as Qwen2.5-Instruct's
    transformers.Qwen2ForCausalLM(config).save_pretrained(init)
    answer = lambda text: [{"role": "assistant", "content": text}]  # short: SFT learns to end its turn in a few steps
    lines = write(tmp_path / "chat.jsonl", [{"prompt": chat.hh_messages(r["prompt"]), "chosen": answer("Sure."),
                                             "rejected": answer(r["rejected"].split(".")[0].strip() + ".")}
                                            for r in pairs])
    proc = run_train("--preset", "micro", "--init", init, "--data", lines, "--out", out, "--sft-steps", "30",
                     "--sft-lr", "1e-2", "--rm-epochs", "1", "--dpo-epochs", "1", "--ppo-iterations", "1",
                     "--ppo-rollouts", "8", "--eval-prompts", "6", "--eval-samples", "1", "--easy-fraction", "0.5",
                     "--max-new-tokens", "8", "--export-hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rendered with the chat template of {init / 'tokenizer_config.json'}; a response ends with <|im_end|>" in proc.stdout
    samples = json.loads((out / "eval" / "samples.json").read_text())
    texts = [s[m] for s in samples for m in ("sft", "mpo")]
    assert all(s["prompt"].startswith("<|im_start|>system\n") and s["prompt"].endswith("<|im_start|>assistant\n")
               for s in samples)
    assert all(t.count("<|im_end|>") <= 1 and (t.endswith("<|im_end|>") or "<|im_end|>" not in t) for t in texts)
    assert any(t.endswith("<|im_end|>") for t in texts), texts
    hf = out / "hf" / "mpo"
    prompt = chat.hh_messages(pairs[0]["prompt"])
    ours = chat.load("auto", path).render(prompt, True)
    assert transformers.AutoTokenizer.from_pretrained(hf).apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True) == ours
    assert im_end in transformers.GenerationConfig.from_pretrained(hf).eos_token_id
    assert transformers.AutoModelForCausalLM.from_pretrained(hf).generation_config.eos_token_id[0] == im_end


def test_the_flag_and_bad_lines_stop_the_run_with_one_line(tmp_path):
    """--chat-template FILE needs --data and --init; a bad conversation stops train.py with one line
    naming the file, the line and the field, exit status 2, before any stage runs."""
    from cli import run_train
    (tmp_path / "t.jinja").write_text(QWEN)
    lines = write(tmp_path / "pairs.jsonl", [GOOD] * 30 + [BAD[0][0]])
    for flags, message in (([], "give --data"), (["--data", lines], "give --init"),
                           (["--chat-template", "none", "--data", lines], f"{lines}:31: field 'prompt': message 0 has role 'bot'")):
        proc = run_train("--preset", "micro", "--out", tmp_path / "run", "--chat-template", tmp_path / "t.jinja", *flags)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "run" / "tokenizer").exists()
