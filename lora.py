"""Low-rank adapters (LoRA, Hu et al. 2021): a frozen projection W plus a trained low-rank update,

    y = W x + b + (alpha / r) B A dropout(x),    A (r, in) random, B (out, r) zero,

so an adapted model starts equal to its base, and a projection trains r (in + out) numbers instead
of in x out (at Qwen2.5-1.5B and rank 16, 1% of the weights: no gradients or AdamW state for the
rest, which can stay in bf16).

MPO gets each stage's KL reference from it for free: a stage's reference is the policy it starts
from (stage 1: SFT; stage 2: the DPO policy), and that is exactly the base with the adapters
switched off (AdaptersOff), with no copy of it. Stage 1's adapter is merged into the weights
before stage 2 puts a fresh one on them, so stage 2's base, and reference, is the DPO policy.
"""
import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import float32_or_wider, scalar_head

# the projections of each layout, by module name (model.py's GPT-2 layout, llama.py's Llama layout)
PROJECTIONS = {"attn": ("attn.c_attn", "attn.c_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("mlp.c_fc", "mlp.c_proj", "gate_proj", "up_proj", "down_proj")}
TARGETS = ["attn", "mlp", *PROJECTIONS["attn"], *PROJECTIONS["mlp"]]
LORA_STAGES = ["sft", "rm", "dpo", "ppo"]  # rm: the reward model and the judge; ppo: the policy and the critic


@dataclass
class LoRAConfig:
    """Flags --lora-*. Each field's "range" is what checks.py accepts (an interval: [ and ] include the end)."""
    rank: int = field(default=0, metadata={"help": "adapter rank r (0: no adapters, full fine-tuning)",
                                           "range": "[0, inf)"})
    alpha: float = field(default=32.0, metadata={"help": "adapter scale alpha: the update is (alpha / r) B A",
                                                 "range": "(0, inf)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input", "range": "[0, 1)"})
    targets: str = field(default="attn,mlp", metadata={
        "help": "comma list of projections to adapt: attn and mlp (all of each), or module names: "
                + ",".join(TARGETS[2:]), "kind": "lora targets"})
    stages: str = field(default="dpo,ppo", metadata={"help": "comma list of the stages that train adapters, the "
                                                     "others full weights: " + ",".join(LORA_STAGES),
                                                     "kind": "lora stages"})

    def applies(self, stage):
        return self.rank > 0 and stage in self.stages.split(",")


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base` plus (alpha / r) B A; `enabled` False leaves the base alone."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        # the adapter in float32 whatever the base's storage: it is the trained master copy
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation, as PEFT
        self.alpha, self.scale = alpha, alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def merged(self):
        """The base with W + (alpha / r) B A folded in (in float32 or wider, then its storage dtype)."""
        with torch.no_grad():
            w = self.base.weight
            w.copy_((float32_or_wider(w) + self.scale * (self.lora_B @ self.lora_A)).to(w.dtype))
        return self.base


def targeted(name, targets):
    """Whether the projection of module name `name` (transformer.h.0.attn.c_attn) is one of `targets`."""
    for t in targets.split(","):
        for projection in PROJECTIONS.get(t, (t,)):
            if name == projection or name.endswith("." + projection):
                return True
    return False


def projections(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def missing_target(model, targets):
    """What is wrong with a comma list of targets for this model, in words, or None: each must name
    a projection it has."""
    for t in targets.split(","):
        if not any(targeted(name, t) for name, _ in projections(model)):
            names = sorted({name.split(".", 3)[-1] for name, _ in projections(model) if targeted(name, "attn,mlp")})
            return f"a {type(model).__name__} has no projection {t!r} (it has attn, mlp, {', '.join(names)})"
    return None


def add_adapters(model, cfg):
    """Freeze every weight of model and put adapters (cfg: a LoRAConfig) on its targeted projections,
    in place. A ScalarModel's head stays trained (the critic's value head, the reward model's head).
    Returns the model; with nothing targeted, a ValueError (checks.py checks the targets first)."""
    model.requires_grad_(False)
    chosen = [(name, m) for name, m in projections(model) if targeted(name, cfg.targets)]
    if not chosen:
        raise ValueError(f"--lora-targets {cfg.targets}: the model has no such projection")
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    if hasattr(model, "head"):
        model.head.requires_grad_(True)
    return model


def adapters(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge(model):
    """Fold every adapter into its weights, in place: the plain model, equal to the adapted one up to
    float order (and the storage dtype's rounding). A model without adapters is left as it is."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.merged())
    return model


@contextlib.contextmanager
def switched_off(model):
    """Inside: model computes its base, every adapter disabled."""
    layers = adapters(model)
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


class AdaptersOff(nn.Module):
    """The base of an adapted model, sharing its weights: the same calls as the model, computed with
    the adapters off (no_grad: a frozen reference or reward model). head, if given, replaces a
    scalar model's own: the reward model is the critic's backbone with the reward model's head."""

    def __init__(self, model, head=None):
        super().__init__()
        self._model = [model]  # a list, so not a submodule: its parameters stay the model's alone
        self.config = model.config
        self.head = head

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        model = self._model[0]
        with switched_off(model):
            if self.head is None:
                return model(*args, **kwargs)
            return scalar_head(self.head, model.gpt(*args, hidden=True, **kwargs))
