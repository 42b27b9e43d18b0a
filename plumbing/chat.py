"""Conversations and chat templates: TRL's conversational lines ({"role", "content"} messages) checked
one by one, and rendered to the prompt and answer texts every stage reads.

With a template (an instruct model's chat_template), rendered in a sandboxed Jinja environment as
transformers' apply_chat_template renders it: the prompt is the conversation before the last
assistant turn with the generation prompt; the answer is what the whole conversation renders after
that prompt, less the text the template writes after an answer (`ending`, ChatML's "<|im_end|>\\n").
Its first token, the end of turn (<|im_end|>), is the token a response ends with: data.encode_response
appends it once, and sampling stops at it. So the scored tokens are the answer's and one end of turn;
the rest of `ending` (ChatML's "\\n") separates turns, is never generated, and is not scored. The whole
conversation is rendered at once, so a default system prompt (Qwen2.5's) appears once.

Without a template, in the HH-RLHF text form the built-in task uses: "\\n\\nHuman: ...\\n\\nAssistant:"
and the answer after a space. This module imports no other of the project: its mistakes are ChatError,
which data.py turns into one-line errors naming the file and the line.
"""
import functools
import hashlib
import json
import os
import re
from datetime import datetime
from typing import NamedTuple, Optional

ROLES = ("system", "user", "assistant")
HH_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}  # the HH-RLHF text form's speakers
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PROBE = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "PROBE-ANSWER-7F3A"}]


class ChatError(ValueError):
    """A conversation or a template that cannot be used: the message names where."""


# ----------------------------------------------------------------------------- messages

def messages(value, field, where):
    """A field holding a conversation: a non-empty list of {"role", "content"} messages whose role is
    system, user or assistant and whose content is a string. -> [{"role", "content"}]."""
    if not isinstance(value, list):
        raise ChatError(f"{where}: field {field!r} must be a list of messages, not {type(value).__name__}")
    if not value:
        raise ChatError(f"{where}: field {field!r} is an empty conversation")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"{where}: field {field!r}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: field {field!r}: message {i} has role {m['role']!r}: choose from {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatError(f"{where}: field {field!r}: message {i}'s content must be a string, "
                            f"not {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(conversation, field, where):
    last = conversation[-1]
    if last["role"] != "assistant":
        raise ChatError(f"{where}: field {field!r}: the last turn is the {last['role']}'s, not the assistant's")
    if not last["content"].strip():
        raise ChatError(f"{where}: field {field!r}: the assistant's answer is empty")
    return last["content"]


def preference(row, where):
    """A line of TRL's conversational preference format -> (prompt messages, chosen answer, rejected
    answer). Explicit prompt: "prompt" a list of messages, "chosen" and "rejected" the assistant's
    answer (a list of one message). Implicit prompt: "chosen" and "rejected" whole conversations that
    share everything before their last assistant turn, which is the prompt."""
    prompt = messages(row["prompt"], "prompt", where) if "prompt" in row else []
    sides = []
    for field in ("chosen", "rejected"):
        if field not in row:
            raise ChatError(f"{where}: missing field {field!r}")
        sides.append(prompt + messages(row[field], field, where))
    answers = [_answer(conversation, field, where) for conversation, field in zip(sides, ("chosen", "rejected"))]
    (*chosen, _), (*rejected, _) = sides
    if chosen != rejected:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        raise ChatError(f"{where}: fields 'chosen' and 'rejected' differ at message {at - len(prompt)}, before "
                        "their last assistant turn: the two conversations must share the prompt")
    if not chosen:
        raise ChatError(f"{where}: field 'chosen' holds the answer alone: no prompt before it (give 'prompt', or "
                        "whole conversations in 'chosen' and 'rejected')")
    return chosen, answers[0], answers[1]


def demonstrations(row, where):
    """A demonstration line, {"messages": [...]} (or TRL's {"prompt": [...], "completion": [...]}), ->
    [(prompt messages, answer)], one per assistant turn after the first message: SFT learns every
    assistant turn, each with the conversation before it as its prompt."""
    if "messages" in row:
        conversation = messages(row["messages"], "messages", where)
        field = "messages"
    else:
        conversation = messages(row.get("prompt"), "prompt", where) + messages(row.get("completion"), "completion", where)
        field = "completion"
    _answer(conversation, field, where)
    return [(conversation[:i], m["content"]) for i, m in enumerate(conversation)
            if i and m["role"] == "assistant" and m["content"].strip()]


def hh_messages(text):
    """An HH-RLHF dialogue, "\\n\\nHuman: ...\\n\\nAssistant: ...", -> its messages (a final empty
    Assistant turn, the prompt's end, dropped); each turn's text less the one space after its speaker."""
    parts = re.split(r"\n\n(Human|Assistant):", text)
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.removeprefix(" ")}
             for who, said in zip(parts[1::2], parts[2::2])]
    if parts[0]:  # text before the first speaker: a preamble, kept as the system's
        turns.insert(0, {"role": "system", "content": parts[0]})
    return turns[:-1] if turns and turns[-1] == {"role": "assistant", "content": ""} else turns


def hh_text(conversation):
    """Messages in the HH-RLHF text form, a prompt ending in "\\n\\nAssistant:"."""
    return "".join(f"\n\n{HH_NAMES[m['role']]}: {m['content']}" for m in conversation) + "\n\nAssistant:"


def generation_header(template):
    """What a prompt ends with, after its conversation, for the assistant to answer: the template's
    generation prompt (ChatML's "<|im_start|>assistant\\n"), or with template None the HH-RLHF text
    form's "\\n\\nAssistant:"."""
    if template is None:
        return "\n\nAssistant:"
    return template.render(PROBE[:1], True)[len(template.render(PROBE[:1], False)):]


class Conversations:
    """{a rendered prompt: its messages} (data.conversations), found by the whole prompt or, for one
    cut from the left to fit a context, by its end: prompts indexed by their last END characters,
    so that a cut prompt is looked up among a few, not all of a data set's."""
    END = 32

    def __init__(self, prompts):
        self.prompts, self.by_end = dict(prompts), {}
        for prompt in self.prompts:
            self.by_end.setdefault(prompt[-self.END:], []).append(prompt)

    def cut(self, head):
        """The messages of the prompt that `head`, a prompt cut from the left, ends, or None."""
        candidates = self.by_end.get(head[-self.END:], []) if len(head) >= self.END else self.prompts
        return next((self.prompts[p] for p in candidates if p.endswith(head)), None)


def conversation_of(text, header, conversations):
    """A rendered prompt and answer (`text`, as a policy's tokens decode) -> (the prompt's messages,
    the answer), or None: the prompt is the text up to a `header` that ends one of `conversations`
    (Conversations), or, for a prompt cut from the left to fit the context, ends the end of one. The
    HH-RLHF text form's answer loses the space after its speaker."""
    ends = [m.end() for m in re.finditer(re.escape(header), text)]
    whole = conversations.prompts
    found = next(((whole[text[:end]], end) for end in ends if text[:end] in whole), None)
    if found is None:  # a cut prompt: the end of a known one
        found = next(((messages, end) for end in ends for messages in [conversations.cut(text[:end])] if messages),
                     None)
    if found is None:
        return None
    messages, end = found
    answer = text[end:]
    return messages, answer.removeprefix(" ") if header == generation_header(None) else answer


# ----------------------------------------------------------------------------- templates

class Template(NamedTuple):
    """A chat template, checked: its Jinja text and where it came from, the special tokens it may
    read (tokenizer_config.json's bos_token, eos_token, ..., as transformers passes them), `ending`,
    the text it writes after an answer, and `end_of_turn`, the special token `ending` starts with
    (None where it starts with none: the model's end of sequence then ends an answer)."""
    source: str
    path: str
    tokens: dict
    ending: str
    end_of_turn: Optional[str]

    def render(self, conversation, generation_prompt):
        """The conversation as the template writes it, with the assistant's header after it when
        generation_prompt: transformers' apply_chat_template(..., tokenize=False)."""
        try:
            return _compiled(self.source).render(messages=conversation, tools=None, documents=None,
                                                 add_generation_prompt=generation_prompt, **self.tokens)
        except Exception as e:  # the template's own error (raise_exception), or Jinja's, on one line
            raise ChatError(f"the chat template of {self.path} fails to render: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def sha256(self):
        return hashlib.sha256(json.dumps([self.source, self.tokens]).encode()).hexdigest()

    def rerendered(self, prompt, answer, ended):
        """A prompt's messages and an answer in this template: the whole conversation with the answer
        as the assistant's turn when the answer ended, else the prompt with the generation prompt and
        the answer after it, unended (a response cut at the length limit)."""
        if not ended:
            return self.render(prompt, True) + answer
        return self.render(prompt + [{"role": "assistant", "content": answer}], False)


@functools.lru_cache(maxsize=8)
def _compiled(source):
    """The template compiled as transformers compiles it: an immutable sandbox (no attribute access to
    Python internals, no mutation of the data), trim_blocks and lstrip_blocks, loop controls, the
    {% generation %} tag (rendered as its body), tojson as json.dumps, raise_exception, strftime_now."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(source)


def _read_json(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatError(f"{path}: cannot read it ({e})") from None


def folder_template(folder):
    """A tokenizer folder's chat template, (its text, the file it is in), or None: chat_template.jinja,
    else tokenizer_config.json's chat_template (a string, or a list of named ones: "default")."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(path) if os.path.isfile(path) else {}
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    return (source, path) if isinstance(source, str) and source.strip() else None


def special_tokens(config):
    """tokenizer_config.json's special tokens by name, as strings ({"content": ...} in older files)."""
    out = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key) if isinstance(config, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def load(choice, tokenizer_path):
    """--chat-template: "none" -> None; "auto" -> the template beside the tokenizer.json at
    tokenizer_path (--init's), or None when it has none; else the Jinja file `choice`. The template
    is compiled and rendered once on a user turn and an assistant turn, to find its ending and end of
    turn among the tokenizer's special tokens."""
    if choice == "none" or not tokenizer_path:
        return None
    folder = os.path.dirname(tokenizer_path)
    if choice == "auto":
        found = folder_template(folder)
        if found is None:
            return None
        source, path = found
    else:
        try:
            with open(choice, encoding="utf-8") as f:
                source, path = f.read(), choice
        except (OSError, UnicodeDecodeError) as e:
            raise ChatError(f"--chat-template {choice}: cannot read it ({e})") from None
    config_path = os.path.join(folder, "tokenizer_config.json")
    tokens = special_tokens(_read_json(config_path) if os.path.isfile(config_path) else {})
    try:
        _compiled(source)
    except Exception as e:  # jinja2.TemplateSyntaxError
        raise ChatError(f"{path}: not a Jinja template ({str(e).splitlines()[0]})") from None
    probe = Template(source, path, tokens, "", None).render(PROBE, False)
    if PROBE[1]["content"] not in probe:
        raise ChatError(f"{path}: the template does not write the assistant's answer as it is given")
    ending = probe[probe.rindex(PROBE[1]["content"]) + len(PROBE[1]["content"]):]
    added = _read_json(tokenizer_path).get("added_tokens") or []
    special = sorted((t["content"] for t in added if isinstance(t, dict) and t.get("special")), key=len, reverse=True)
    end_of_turn = next((t for t in special if ending.startswith(t)), None)
    return Template(source, path, tokens, ending, end_of_turn)


def choose(choice, tokenizer_path, path, kind):
    """The template a data file of format `kind` is read with (load), and the one line the run says
    about it, or None: conversations and HH-RLHF dialogues are rendered with it, conversations without
    one in the HH-RLHF text form; the other formats' plain text is read as it is."""
    template = load(choice, tokenizer_path)
    if template and kind not in ("chat", "hh"):
        return None, f"{path}: plain text ({kind}), read as it is: the chat template of {template.path} is not used"
    if template:
        return template, (f"{path}: rendered with the chat template of {template.path}; a response ends with "
                          f"{template.end_of_turn or 'the end of sequence'}")
    if kind == "chat":
        return None, (f"{path}: no chat template (--chat-template none, or none beside --init's tokenizer): "
                      "conversations rendered in the HH-RLHF text form")
    return None, None


def rendered(template, prompt, answers, where):
    """(prompt messages, [answers]) -> (the prompt's text, [each answer's text]), the answer without
    the template's ending (with template None: the HH-RLHF text form, the answer after a space).
    Each whole conversation is rendered at once and the answer is what follows the prompt's render."""
    if template is None:
        return hh_text(prompt), [" " + a for a in answers]

    def render(conversation, generation_prompt):
        try:
            return template.render(conversation, generation_prompt)
        except ChatError as e:
            raise ChatError(f"{where}: {e}") from None
    head = render(prompt, True)
    texts = []
    for answer in answers:
        if template.end_of_turn and answer.rstrip().endswith(template.end_of_turn):
            raise ChatError(f"{where}: an answer ends with the end of turn {template.end_of_turn!r} itself; "
                            "the template writes it")
        whole = render(prompt + [{"role": "assistant", "content": answer}], False)
        if not whole.startswith(head):
            raise ChatError(f"{where}: the chat template of {template.path} renders the prompt with a generation "
                            "prompt differently from the start of the whole conversation")
        rest = whole[len(head):]
        if not rest.endswith(template.ending) or not rest[:len(rest) - len(template.ending)].strip():
            raise ChatError(f"{where}: the chat template of {template.path} does not end this answer with "
                            f"{template.ending!r} as it ends others, or writes it empty")
        texts.append(rest[:len(rest) - len(template.ending)])
    return head, texts
