"""The tokenizer: a byte-level BPE from the `tokenizers` library, trained on the task's text or
loaded from a tokenizer.json (a Hugging Face folder's configs name its special tokens)."""
import json
import os

from plumbing import chat
from plumbing.files import DataError, atomic_write, read_json, write_text

EOS, PAD = "<|endoftext|>", "<|pad|>"


class Tokenizer:
    """A byte-level BPE from the `tokenizers` library, with end-of-sequence and padding ids: the
    ones given (a Hugging Face folder's, see load), else this project's EOS and PAD tokens. A response
    ends with eos_id (a chat run's: the template's end of turn, for_chat); sampling stops at any of
    stop_ids, eos_id first. chat: the chat template and the special tokens it reads, kept for export
    ({"chat_template", "bos_token", ...} of tokenizer_config.json), or None."""

    def __init__(self, tok, eos_id=None, pad_id=None, stop_ids=(), chat=None):
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS) if eos_id is None else eos_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer has no {EOS} token, and no tokenizer_config.json, generation_config.json "
                             "or config.json beside it names an end-of-sequence token")
        pad = tok.token_to_id(PAD) if pad_id is None else pad_id
        self.pad_id = self.eos_id if pad is None else pad  # padding is always masked out
        self.vocab_size = tok.get_vocab_size()
        self.stop_ids = list(dict.fromkeys([self.eos_id, *stop_ids]))
        self.chat = chat
        for name, i in (("end-of-sequence", self.eos_id), ("padding", self.pad_id), *(("stop", i) for i in stop_ids)):
            if tok.id_to_token(i) is None:
                raise ValueError(f"the {name} id {i} is not a token of the tokenizer ({self.vocab_size} tokens)")

    @classmethod
    def train(cls, texts, vocab_size):
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path):
        """A tokenizer.json, used as it is. When it lies in a Hugging Face folder, the folder's
        configs name its end-of-sequence and padding tokens (special_ids)."""
        from tokenizers import Tokenizer as HFTokenizer
        text = json.dumps(read_json(path))  # a missing file or bad JSON: a clear error; a BOM: gone
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # the library's own message, on one line
            raise DataError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
        folder = os.path.dirname(path)
        try:
            return cls(tok, *cls.special_ids(folder, tok), *cls.chat_ids(folder))
        except ValueError as e:  # chat.ChatError among them
            raise DataError(f"{path}: {e}") from None

    @staticmethod
    def special_ids(folder, tok):
        """(eos_id, pad_id) as a Hugging Face folder names them, None where it does not:
        tokenizer_config.json's eos_token and pad_token (the tokenizer's own, what a response ends
        with in transformers and TRL), else generation_config.json's, then config.json's
        eos_token_id and pad_token_id (the first of a list)."""
        ids = {"eos": None, "pad": None}
        path = os.path.join(folder, "tokenizer_config.json")
        config = read_json(path) if os.path.isfile(path) else {}
        for key in ids:
            token = config.get(f"{key}_token") if isinstance(config, dict) else None
            token = token.get("content") if isinstance(token, dict) else token  # {"content": ...} in older files
            if isinstance(token, str):
                ids[key] = tok.token_to_id(token)
                if ids[key] is None:
                    raise DataError(f"{path}: field '{key}_token' is {token!r}, not a token of tokenizer.json")
        for name in ("generation_config.json", "config.json"):
            path = os.path.join(folder, name)
            config = read_json(path) if os.path.isfile(path) else {}
            for key in ids:
                value = config.get(f"{key}_token_id") if isinstance(config, dict) else None
                value = value[0] if isinstance(value, list) and value else value
                if ids[key] is None and value is not None:
                    if type(value) is not int or tok.id_to_token(value) is None:
                        raise DataError(f"{path}: field '{key}_token_id' is {value!r}, not a token of tokenizer.json")
                    ids[key] = value
        return ids["eos"], ids["pad"]

    @staticmethod
    def chat_ids(folder):
        """(stop ids, chat) as a Hugging Face folder names them: generation_config.json's eos_token_id
        (a list: transformers' generate stops at each), and the folder's chat template with
        tokenizer_config.json's special tokens (chat.folder_template), or None."""
        path = os.path.join(folder, "generation_config.json")
        eos = (read_json(path) if os.path.isfile(path) else {}) or {}
        eos = eos.get("eos_token_id") if isinstance(eos, dict) else None
        stops = [i for i in (eos if isinstance(eos, list) else [eos]) if type(i) is int]
        found = chat.folder_template(folder)
        if found is None:
            return stops, None
        config = os.path.join(folder, "tokenizer_config.json")
        return stops, {"chat_template": found[0], **chat.special_tokens(read_json(config) if os.path.isfile(config) else {})}

    def for_chat(self, template):
        """This tokenizer as a chat run's, rendering with `template` (a chat.Template): a response ends
        with its end of turn (where it has none, with this end of sequence), sampling also stops at
        this tokenizer's stop ids, and the template is kept for export."""
        eot = self.eos_id if template.end_of_turn is None else self.tok.token_to_id(template.end_of_turn)
        return Tokenizer(self.tok, eot, self.pad_id, self.stop_ids, {"chat_template": template.source, **template.tokens})

    def save(self, path):
        """tokenizer.json; with special tokens other than EOS and PAD, or a chat template, a
        tokenizer_config.json beside it names them (as a Hugging Face folder does), and with stop ids
        besides eos_id, or a chat template, a generation_config.json lists them, so that load finds
        them again and transformers' generate stops where sampling here does."""
        atomic_write(path, self.tok.save)
        own_eos, own_pad = self.tok.token_to_id(EOS), self.tok.token_to_id(PAD)
        folder = os.path.dirname(path)
        if (self.eos_id, self.pad_id) != (own_eos, own_eos if own_pad is None else own_pad) or self.chat:
            write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(
                {**(self.chat or {}), "tokenizer_class": "PreTrainedTokenizerFast",
                 "eos_token": self.tok.id_to_token(self.eos_id), "pad_token": self.tok.id_to_token(self.pad_id)},
                indent=2))
        if self.stop_ids != [self.eos_id] or self.chat:
            write_text(os.path.join(folder, "generation_config.json"), json.dumps(
                {"eos_token_id": self.stop_ids, "pad_token_id": self.pad_id}, indent=2))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """The text of ids, without end-of-sequence and padding tokens; a chat run's (self.chat)
        shows its other special tokens (the template's markers) and an end of turn that is not padding."""
        if self.chat:
            return self.tok.decode([i for i in ids if i != self.pad_id], skip_special_tokens=False)
        ids = [i for i in ids if i not in (self.eos_id, self.pad_id)]
        return self.tok.decode(ids)
