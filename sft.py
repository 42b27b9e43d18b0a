"""SFT, the paper's pi_sft: next-token loss on the response tokens of demonstrations."""
from dataclasses import dataclass, field

import data
from model import response_token_logps, sft_loss
from training import FitConfig, fit, fit_field


@dataclass
class SFTConfig(FitConfig):
    """fit()'s settings are FitConfig's, with SFT's own defaults. Each field's "range" is what
    checks.py accepts (an interval: [ and ] include the end)."""
    # 1600: over seeds 0-4 of the built-in task, as well formed and as good at every stage as 2000, 20% sooner
    steps: int = field(default=1600, metadata={"help": "optimizer steps (0: none, the weights as they start)",
                                               "range": "[0, inf)"})
    batch_size: int = fit_field("batch_size", 32, help="demonstrations per step")
    lr: float = fit_field("lr", 3e-3)
    warmup: int = fit_field("warmup", 50)
    weight_decay: float = fit_field("weight_decay", 0.1)


def train_sft(model, tokenizer, demonstrations, cfg, out_dir, max_response, device, dtype, seed):
    """Next-token loss on the response tokens of the demonstrations; returns the final loss."""
    block = model.config.block_size
    examples = []
    for p, r in demonstrations:
        response = data.encode_response(tokenizer, r)[:max_response]
        examples.append((tokenizer.encode(p)[-(block - len(response)):], response))

    def step_loss(forward, batch):
        return sft_loss(response_token_logps(forward, batch), batch["response_mask"]), {}

    collate = lambda rows: data.collate(*zip(*rows), tokenizer.pad_id)
    tokens = lambda batch: batch["response_mask"][:, 1:].sum().item()  # what the loss averages over
    row = fit(model, examples, collate, step_loss, cfg, cfg.steps, out_dir, seed, device, dtype, "sft", units=tokens)
    return row.get("loss", float("nan"))  # nan: --sft-steps 0, nothing trained
