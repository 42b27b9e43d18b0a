"""SFT, the paper's pi_sft: next-token loss on the response tokens of demonstrations."""
from dataclasses import dataclass, field

import data
from model import response_logits, sft_loss
from training import fit


@dataclass
class SFTConfig:
    """Each field's "range" is what checks.py accepts (an interval: [ and ] include the end)."""
    steps: int = field(default=2000, metadata={"help": "optimizer steps (0: none, the weights as they start)",
                                               "range": "[0, inf)"})
    batch_size: int = field(default=32, metadata={"help": "demonstrations per step", "range": "[1, inf)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate", "range": "(0, inf)"})
    warmup: int = field(default=50, metadata={"help": "warmup steps", "range": "[0, inf)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay", "range": "[0, inf)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip", "range": "(0, inf)"})
    save_every: int = field(default=50, metadata={"help": "save a resumable step state every N steps (0: never)",
                                                  "range": "[0, inf)"})


def train_sft(model, tokenizer, demonstrations, cfg, out_dir, max_response, device, dtype, seed):
    """Next-token loss on the response tokens of the demonstrations; returns the final loss."""
    block = model.config.block_size
    examples = []
    for p, r in demonstrations:
        response = data.encode_response(tokenizer, r)[:max_response]
        examples.append((tokenizer.encode(p)[-(block - len(response)):], response))

    def step_loss(forward, batch):
        return sft_loss(*response_logits(forward, batch)), {}

    collate = lambda rows: data.collate(*zip(*rows), tokenizer.pad_id)
    tokens = lambda batch: batch["response_mask"][:, 1:].sum().item()  # what the loss averages over
    row = fit(model, examples, collate, step_loss, cfg, cfg.steps, out_dir, seed, device, dtype, "sft", units=tokens)
    return row.get("loss", float("nan"))  # nan: --sft-steps 0, nothing trained
