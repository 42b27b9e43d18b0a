"""The tokenizer: a byte-level BPE from the `tokenizers` library, trained on the task's text or
loaded from a tokenizer.json (a Hugging Face folder's configs name its special tokens)."""
import json
import os

from data import DataError, atomic_write, read_json, write_text

EOS, PAD = "<|endoftext|>", "<|pad|>"


class Tokenizer:
    """A byte-level BPE from the `tokenizers` library, with end-of-sequence and padding ids: the
    ones given (a Hugging Face folder's, see load), else this project's EOS and PAD tokens."""

    def __init__(self, tok, eos_id=None, pad_id=None):
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS) if eos_id is None else eos_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer has no {EOS} token, and no tokenizer_config.json, generation_config.json "
                             "or config.json beside it names an end-of-sequence token")
        pad = tok.token_to_id(PAD) if pad_id is None else pad_id
        self.pad_id = self.eos_id if pad is None else pad  # padding is always masked out
        self.vocab_size = tok.get_vocab_size()
        for name, i in (("end-of-sequence", self.eos_id), ("padding", self.pad_id)):
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
        try:
            return cls(tok, *cls.special_ids(os.path.dirname(path), tok))
        except ValueError as e:
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

    def save(self, path):
        """tokenizer.json; with special tokens other than EOS and PAD, a tokenizer_config.json beside
        it names them (as a Hugging Face folder does), so that load finds them again."""
        atomic_write(path, self.tok.save)
        own_eos, own_pad = self.tok.token_to_id(EOS), self.tok.token_to_id(PAD)
        if (self.eos_id, self.pad_id) != (own_eos, own_eos if own_pad is None else own_pad):
            write_text(os.path.join(os.path.dirname(path), "tokenizer_config.json"), json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.tok.id_to_token(self.eos_id),
                 "pad_token": self.tok.id_to_token(self.pad_id)}, indent=2))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        ids = [i for i in ids if i not in (self.eos_id, self.pad_id)]
        return self.tok.decode(ids)
