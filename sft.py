"""SFT, the paper's pi_sft: next-token loss on the response tokens of demonstrations."""
import os
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
from dpo import sequence_logps
from training import StepState, autocast, compiled, cosine_lr, grad_scaler, optimizer_step, set_lr, truncate_jsonl


@dataclass
class SFTConfig:
    steps: int = field(default=250, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "demonstrations per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=20, metadata={"help": "warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    save_every: int = field(default=50, metadata={"help": "save a resumable step state every N steps (0: never)"})


def train_sft(model, tokenizer, demonstrations, cfg, out_dir, max_response, device, dtype, seed):
    """Next-token loss on the response tokens of the demonstrations; resumes from a step state."""
    block = model.config.block_size
    examples = []
    for p, r in demonstrations:
        response = data.encode_response(tokenizer, r)[:max_response]
        examples.append((tokenizer.encode(p)[-(block - len(response)):], response))
    g = torch.Generator().manual_seed(seed)
    plan = []
    while len(plan) < cfg.steps:
        plan += data.batches(len(examples), cfg.batch_size, g)
    opt = model.configure_optimizers(cfg.lr, cfg.weight_decay, device_type=torch.device(device).type)
    scaler = grad_scaler(device, dtype)
    state = StepState(out_dir, cfg.save_every, cfg.steps, {"model": model}, {"opt": opt})
    start, _ = state.restore()
    metrics = os.path.join(out_dir, "metrics.jsonl")
    truncate_jsonl(metrics, "step", start)
    model.train()
    forward = compiled(model)
    bar = tqdm(plan[:cfg.steps], desc="sft", dynamic_ncols=True, initial=start)
    for step, idx in enumerate(plan[start:cfg.steps], start):
        set_lr(opt, cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr))
        batch = data.collate(*zip(*[examples[i] for i in idx]), tokenizer.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, dtype):
            logits = forward(batch["input_ids"], batch["attention_mask"])
        loss = -sequence_logps(logits, batch["input_ids"], batch["response_mask"]).sum() / batch["response_mask"][:, 1:].sum()
        optimizer_step(loss, opt, cfg.grad_clip, scaler, step)
        data.append_jsonl(metrics, {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        state.save(step + 1)
    bar.close()
    return loss.item()
