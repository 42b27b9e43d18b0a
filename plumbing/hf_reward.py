"""A reward model of your own (--reward-model): a Hugging Face sequence classifier of the GPT-2,
Llama or Qwen2 layout (GPT2ForSequenceClassification, LlamaForSequenceClassification,
Qwen2ForSequenceClassification: a backbone and a `score` head with one label) in the place of the
rm stage's. Checked before any work (check_reward_model), then read as transformers reads it: the
score at the rightmost token that is not config.json's pad_token_id. Its tokenizer may differ from
the policy's: then each text is re-tokenised for it, and a conversation is re-rendered with the
reward model's own chat template where it has one (ReadAsTransformers).
"""
import hashlib
import os
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from plumbing.checkpoint import CheckpointError, check_finite, file_sha256, load_checkpoint, read_config_json, weight_files
from data import left_pad
from plumbing import chat
from plumbing.files import DataError
from plumbing.hf import load_hf_gpt2, load_hf_llama
from model import ScalarModel
from reward import load_reward_model, rewards_at_last_token
from plumbing.tokenizer import Tokenizer

CLASSIFIERS = {"GPT2ForSequenceClassification": "gpt2", "LlamaForSequenceClassification": "llama",
               "Qwen2ForSequenceClassification": "qwen2"}  # config.json's architectures: its model_type
SCORED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "chat_template.jinja")  # besides the weights


class RewardModel(NamedTuple):
    """--reward-model, checked: its folder and the content hash of everything that makes its scores
    (weights, config.json's pad_token_id, the tokenizer), which the stages that read it fingerprint."""
    path: str
    sha256: str


def is_sequence_classifier(folder):
    """A Hugging Face folder (--reward-model), not a reward model of this project's (config.json's kind)."""
    return "kind" not in read_config_json(os.path.join(folder, "config.json"))


def pad_token_id(folder):
    """config.json's pad_token_id, or None: the token transformers does not read a score at."""
    file = os.path.join(folder, "config.json")
    pad = read_config_json(file).get("pad_token_id")
    if pad is not None and (type(pad) is not int or pad < 0):
        raise CheckpointError(f"{file}: field 'pad_token_id' must be a token id, not {pad!r}")
    return pad


def load_sequence_classifier(folder, device="cpu", dtype=torch.float32):
    """A ScalarModel from a *ForSequenceClassification folder: the backbone as plumbing/hf.py loads it (in
    dtype) and the score head (1, C), which has no bias, as a float32 head whose bias is zero."""
    file = os.path.join(folder, "config.json")
    hf = read_config_json(file)
    named = [a for a in hf.get("architectures") or [] if a in CLASSIFIERS]
    if not named:
        raise CheckpointError(f"{file}: field 'architectures' is {hf.get('architectures')!r}, not a sequence "
                              f"classifier ({', '.join(CLASSIFIERS)})")
    if hf.get("model_type") != CLASSIFIERS[named[0]]:
        raise CheckpointError(f"{file}: field 'model_type' is {hf.get('model_type')!r}, but {named[0]} "
                              f"is {CLASSIFIERS[named[0]]!r}")
    # transformers counts labels by id2label, else num_labels, else 2 (PretrainedConfig's default)
    labels = len(hf["id2label"]) if isinstance(hf.get("id2label"), dict) else hf.get("num_labels", 2)
    if labels != 1:
        raise CheckpointError(f"{file}: {labels} labels (field 'id2label'); a reward model has one, its score")
    pad_token_id(folder)
    body = (load_hf_gpt2(folder, device, dtype) if hf["model_type"] == "gpt2"
            else load_hf_llama(folder, device, classifier=True, dtype=dtype))
    score = next((f for f in weight_files(folder) if "score.weight" in safe_open(f, "pt").keys()), None)
    if score is None:
        raise CheckpointError(f"{folder}: no tensor 'score.weight' (the sequence classifier's head)")
    weight = check_finite({"score.weight": safe_open(score, "pt").get_tensor("score.weight")}, score)["score.weight"]
    if weight.shape != (1, body.config.n_embd):
        raise CheckpointError(f"{score}: 'score.weight' has shape {tuple(weight.shape)}, config.json needs "
                              f"{(1, body.config.n_embd)}")
    with torch.device("meta"):  # the shell alone: the body is the one just loaded
        model = ScalarModel(body.config, type(body))
    model.gpt, model.head = body, nn.Linear(body.config.n_embd, 1)
    with torch.no_grad():
        model.head.weight.copy_(weight.float())
        model.head.bias.zero_()
    return model.to(device)


def same_tokenizer(a, b):
    """Do two tokenizers give the same ids for every text, and end a response with the same token?"""
    return a.eos_id == b.eos_id and a.tok.to_str() == b.tok.to_str()


class ReadAsTransformers(nn.Module):
    """A sequence classifier called as the run's own reward model is: on the policy's token ids
    (B, T) and their attention mask, it returns (B, T), each row's score at every position (so
    that reward.rewards_at_last_token reads it there). Each row's real tokens, a long one cut from
    the left to the model's context, are scored as transformers' forward scores them: at the
    rightmost token that is not pad_token_id (None: the last one). With `own`, the model's tokenizer
    where it is not the policy's, the row's text (prompt and response) is encoded with it, and a
    response the policy ended gets the model's own end-of-sequence token. With `template`, the model's
    own chat template, a row whose prompt is one of `conversations` ({a rendered prompt: its
    messages}, data.conversations) is rendered anew in it, as TRL renders a conversation for a reward
    model of another tokenizer: the messages and the answer, ended by the template's end of turn."""

    def __init__(self, model, pad_token_id, tokenizer, own=None, template=None, conversations=None):
        super().__init__()
        self.model, self.config = model, model.config
        self.pad_token_id, self.tokenizer, self.own = pad_token_id, tokenizer, own
        self.template, self.conversations = template, chat.Conversations(conversations or {}) if template else None
        self.header = chat.generation_header(policy_template(tokenizer)) if template else None

    def retokenized(self, ids):
        ended = bool(ids) and ids[-1] in self.tokenizer.stop_ids
        text = self.tokenizer.decode(ids[:-1] if ended else ids)
        found = self.template and chat.conversation_of(text, self.header, self.conversations)
        if found:
            return self.own.encode(self.template.rerendered(*found, ended))
        return self.own.encode(text) + ([self.own.eos_id] if ended else [])

    @torch.no_grad()
    def forward(self, idx, attention_mask, plan=None):  # plan: the policy's rows', not the ones scored here
        rows = [ids[m.bool()].tolist() for ids, m in zip(idx.cpu(), attention_mask.cpu())]
        if self.own is not None:
            rows = [self.retokenized(r) for r in rows]
        ids, mask = (t.to(idx.device) for t in left_pad([r[-self.config.block_size:] for r in rows], 0))
        values = self.model(ids, mask).float()
        read = mask if self.pad_token_id is None else mask * (ids != self.pad_token_id)
        return rewards_at_last_token(values, read)[:, None].expand(idx.shape)


def policy_template(tokenizer):
    """The chat template a policy's prompts were rendered with (Tokenizer.chat), or None: the HH-RLHF
    text form."""
    if not tokenizer.chat:
        return None
    source, tokens = tokenizer.chat["chat_template"], {k: v for k, v in tokenizer.chat.items() if k != "chat_template"}
    return chat.Template(source, "the policy's tokenizer", tokens, "", None)


def own_template(folder):
    """The sequence classifier's own chat template (chat.load), or None where it has none."""
    try:
        return chat.load("auto", os.path.join(folder, "tokenizer.json"))
    except chat.ChatError as e:
        raise DataError(f"--reward-model: {e}") from None


def as_reward_model(folder, tokenizer, model, conversations=None):
    """`model`, the scalar model of the reward model in `folder`, read as that reward model is read:
    as it is for the run's own, through ReadAsTransformers for a sequence classifier (conversations:
    data.conversations, which it renders anew in its own chat template)."""
    if not is_sequence_classifier(folder):
        return model
    own = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    if same_tokenizer(own, tokenizer):
        return ReadAsTransformers(model, pad_token_id(folder), tokenizer)
    return ReadAsTransformers(model, pad_token_id(folder), tokenizer, own, own_template(folder), conversations)


def reward_model_at(folder, tokenizer, device="cpu", dtype=torch.float32, conversations=None):
    """The reward model in `folder`, frozen, scoring the policy's token ids: the rm stage's, or a
    sequence classifier (--reward-model); its weights in dtype."""
    if not is_sequence_classifier(folder):
        return load_reward_model(folder, device, dtype)
    model = load_sequence_classifier(folder, device, dtype).eval().requires_grad_(False)
    return as_reward_model(folder, tokenizer, model, conversations).eval()


def critic_start(rm_dir, sft_dir, tokenizer, block_size, device="cpu", dtype=torch.float32):
    """PPO's critic before training: the reward model (as in the paper's recipe) when it reads the
    policy's tokens as they are, over the policy's whole context; else, a sequence classifier of
    another tokenizer or a shorter context, SFT's weights with a fresh value head. Returns the
    critic (its weights in dtype) and whether it is the reward model."""
    if not is_sequence_classifier(rm_dir):
        return load_checkpoint(rm_dir, kind="scalar", device=device, dtype=dtype)[0], True
    own = Tokenizer.load(os.path.join(rm_dir, "tokenizer.json"))
    model = load_sequence_classifier(rm_dir, device, dtype)
    if same_tokenizer(own, tokenizer) and model.config.block_size >= block_size:
        return model, True
    return load_checkpoint(sft_dir, kind="scalar", device=device, dtype=dtype)[0], False


def content_sha256(folder):
    """The hash of what makes a sequence classifier's scores: its weights, then its configs and tokenizer."""
    h = hashlib.sha256(file_sha256(folder).encode())
    for name in SCORED_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def check_reward_model(path):
    """--reward-model's folder, loaded once before anything is written: a sequence classifier of one
    label whose weights match its config.json, with the tokenizer it was trained with. Returns a
    RewardModel, or None without --reward-model."""
    if not path:
        return None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"{path}: no config.json; --reward-model needs a Hugging Face sequence classifier's folder")
    if not is_sequence_classifier(path):
        raise DataError(f"{path}: a checkpoint of this project, not a Hugging Face sequence classifier")
    model = load_sequence_classifier(path, dtype=None)  # as stored: checked here, loaded again by the stages
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise DataError(f"{path}: no tokenizer.json beside the weights; --reward-model needs the tokenizer "
                        "its scores were trained with")
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise DataError(f"{tok_path}: {tokenizer.vocab_size} tokens, more than the {model.config.vocab_size} "
                        "of the model's config.json")
    pad = pad_token_id(path)
    where = f"the last token that is not {pad}" if pad is not None else "the last token"
    template = own_template(path)  # checked here: it compiles and renders
    print(f"--reward-model {path}: {type(model.gpt).__name__} sequence classifier, scores read at {where}"
          + (f"; conversations rendered anew with its chat template ({template.path}) when its tokenizer is not the "
             "policy's" if template else "") + "; the rm stage is skipped")
    return RewardModel(path, content_sha256(path))
