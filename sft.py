"""SFT, the paper's pi_sft: next-token loss on the response tokens of demonstrations."""
from dataclasses import dataclass

import data
from plumbing.checks import setting
from model import response_token_logps, sft_loss
from training import FitConfig, Runtime, fit


@dataclass
class SFTConfig(FitConfig):
    """fit()'s settings are FitConfig's, with SFT's own defaults."""
    # 1600 rather than 2000: docs/method.md, "What the paper leaves open"
    steps: int = setting(1600, "optimizer steps (0: none, the weights as they start)", range="[0, inf)")
    batch_size: int = setting(32, "demonstrations per step", range="[1, inf)")
    lr: float = setting(3e-3, "peak learning rate", range="(0, inf)")
    warmup: int = setting(50, "warmup steps", range="[0, inf)")
    weight_decay: float = setting(0.1, "AdamW weight decay", range="[0, inf)")


def train_sft(model, tokenizer, demonstrations, cfg, out_dir, max_response, device, dtype, seed, runtime=Runtime()):
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
    row = fit(model, examples, collate, step_loss, cfg, cfg.steps, out_dir, seed, device, dtype, "sft", units=tokens,
              runtime=runtime)
    return row.get("loss", float("nan"))  # nan: --sft-steps 0, nothing trained
