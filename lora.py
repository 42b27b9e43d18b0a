"""Low-rank adapters (LoRA, Hu et al. 2021): a frozen projection W plus a trained low-rank update,

    y = W x + b + (alpha / r) B A dropout(x),    A (r, in) random, B (out, r) zero,

so an adapted model starts equal to its base, and a projection trains r (in + out) numbers instead
of in x out (at Qwen2.5-1.5B and rank 16, 1% of the weights: no gradients or AdamW state for the
rest, which can stay in bf16).

MPO gets each stage's KL reference from it for free: a stage's reference is the policy it starts
from (stage 1: SFT; stage 2: the DPO policy), and that is exactly the model with the stage's own
adapters switched off (AdaptersOff), with no copy of it. A stage's adapter is never merged into a
bf16 base: rounding W + (alpha / r) B A to bf16 loses every entry of the update below half a bf16
ulp of W (80% of the effect of an update of 1e-3 of ||W|| at a q_proj of Qwen2.5-1.5B). It is held
instead, frozen, under the next stage's fresh one (LoRALinear's held adapters), so that stage 2's
base, and reference, is the DPO policy as it was trained. Merging is for --export-hf alone.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.checks import setting
from model import float32_or_wider, scalar_head

# the projections of each layout, by module name (model.py's GPT-2 layout, llama.py's Llama layout)
PROJECTIONS = {"attn": ("attn.c_attn", "attn.c_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("mlp.c_fc", "mlp.c_proj", "gate_proj", "up_proj", "down_proj")}
TARGETS = ["attn", "mlp", *PROJECTIONS["attn"], *PROJECTIONS["mlp"]]
LORA_STAGES = ["sft", "rm", "dpo", "ppo"]  # rm: the reward model and the judge; ppo: the policy and the critic


@dataclass
class LoRAConfig:
    """Flags --lora-*."""
    rank: int = setting(0, "adapter rank r (0: no adapters, full fine-tuning)", range="[0, inf)")
    alpha: float = setting(32.0, "adapter scale alpha: the update is (alpha / r) B A", range="(0, inf)")
    dropout: float = setting(0.0, "dropout on the adapters' input", range="[0, 1)")
    targets: str = setting("attn,mlp", "comma list of projections to adapt: attn and mlp (all of each), or module "
                           "names: " + ",".join(TARGETS[2:]), kind="lora targets")
    stages: str = setting("dpo,ppo", "comma list of the stages that train adapters, the others full weights: "
                          + ",".join(LORA_STAGES), kind="lora stages")

    def applies(self, stage):
        return self.rank > 0 and stage in self.stages.split(",")


class Held(nn.Module):
    """An earlier stage's adapter, frozen: x -> (alpha / r) B A x, its scale folded into B (so its
    output is the trained adapter's bit for bit where alpha / r is a power of two: gpu24's 32 / 16)."""

    def __init__(self, A, B):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("B", B)

    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B)


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base`, the frozen adapters of the stages before this one, and this stage's own:

        y = W x + b + sum_i (alpha_i / r_i) B_i A_i x + (alpha / r) B A dropout(x)

    The earlier stages' adapters (held, in the order they were trained) are never rounded into W:
    each is added to the output as the stage that trained it added it, so a loaded model computes
    what the trained one did. They are held in the dtype the model is held in (in bf16, the cast
    autocast makes of a trained float32 adapter in every forward anyway). At stage 2 of --preset
    gpu24 on Qwen2.5-1.5B: two of rank 16, 2 x 18.5M numbers (74 MB in bf16), and 2.8% more
    multiply-adds in the projections. `enabled` False turns this stage's adapter off: the
    projection as the stage started."""

    def __init__(self, base, rank=0, alpha=1.0, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.held = nn.ModuleList()
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.enabled = True
        if rank:
            self.add(rank, alpha, dropout)

    def add(self, rank, alpha, dropout=0.0):
        """A fresh adapter of this stage: the one before it, if any, joins the held ones (hold)."""
        if self.lora_A is not None:
            self.hold()
        device = self.base.weight.device
        # the adapter in float32 whatever the base's storage: it is the trained master copy
        self.lora_A = nn.Parameter(torch.empty(rank, self.base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation, as PEFT
        self.alpha, self.scale = alpha, alpha / rank
        self.dropout = nn.Dropout(dropout)

    def as_held(self):
        """This stage's adapter as a held one (Held): (A, (alpha / r) B)."""
        return self.lora_A.detach(), self.scale * self.lora_B.detach()

    def hold(self):
        """This stage's adapter, frozen, joins the held ones: the projection computes the same."""
        self.held.append(Held(*self.as_held()))
        self.lora_A = self.lora_B = None

    def forward(self, x):
        y = self.base(x)
        for adapter in self.held:
            y = y + adapter(x)
        if self.lora_A is None or not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def merged(self):
        """The plain base with every adapter folded in, W + sum_i (alpha_i / r_i) B_i A_i, summed in
        float32 (or wider) and rounded once to W's storage dtype: in bf16, as PEFT's merge_and_unload
        rounds a bf16 model, it loses what is below half an ulp of W (only --export-hf writes it so).
        Trainable again, as before its adapters: a stage may train the merged model in full."""
        with torch.no_grad():
            w = self.base.weight
            total = float32_or_wider(w)
            pairs = [(h.A, h.B) for h in self.held] + ([self.as_held()] if self.lora_A is not None else [])
            w.copy_((total + sum(B.to(total.dtype) @ A.to(total.dtype) for A, B in pairs)).to(w.dtype))
        return self.base.requires_grad_(True)


def targeted(name, targets):
    """Whether the projection of module name `name` (transformer.h.0.attn.c_attn) is one of `targets`."""
    for t in targets.split(","):
        for projection in PROJECTIONS.get(t, (t,)):
            if name == projection or name.endswith("." + projection):
                return True
    return False


def projections(model):
    """(name, module) of each projection: an nn.Linear, or a LoRALinear wrapping one (not its base again)."""
    bases = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and id(m) not in bases)]


def missing_target(model, targets):
    """What is wrong with a comma list of targets for this model, in words, or None: each must name
    a projection it has."""
    for t in targets.split(","):
        if not any(targeted(name, t) for name, _ in projections(model)):
            names = sorted({name.split(".", 3)[-1] for name, _ in projections(model) if targeted(name, "attn,mlp")})
            return f"a {type(model).__name__} has no projection {t!r} (it has attn, mlp, {', '.join(names)})"
    return None


def add_adapters(model, cfg):
    """Freeze every weight of model and put fresh adapters (cfg: a LoRAConfig) on its targeted
    projections, in place, over the held adapters of earlier stages where it has them. A
    ScalarModel's head stays trained (the critic's value head, the reward model's head). Returns
    the model; with nothing targeted, a ValueError (plumbing/checks.py checks the targets first)."""
    model.requires_grad_(False)
    chosen = [(name, m) for name, m in projections(model) if targeted(name, cfg.targets)]
    if not chosen:
        raise ValueError(f"--lora-targets {cfg.targets}: the model has no such projection")
    for name, m in chosen:
        if isinstance(m, LoRALinear):
            m.add(cfg.rank, cfg.alpha, cfg.dropout)
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(m, cfg.rank, cfg.alpha, cfg.dropout))
    if hasattr(model, "head"):
        model.head.requires_grad_(True)
    return model


def adapters(model):
    """The projections with an adapter of their own, trained by the stage (not held ones alone)."""
    return [m for m in model.modules() if isinstance(m, LoRALinear) and m.lora_A is not None]


def hold(model):
    """Every adapter of the model joins its projection's held ones, in place (LoRALinear.hold): the
    model as trained, frozen, ready for a later stage's fresh adapters."""
    for m in adapters(model):
        m.hold()
    return model


def holding(model, state):
    """Wrap each projection of an empty model (on the meta device) whose held adapters `state`, the
    state dict about to be loaded, holds (name.held.N.A and .B), in a LoRALinear holding them."""
    for key in sorted((k for k in state if ".held." in k and k.endswith(".A")), key=held_order):
        name, _, _ = key.rpartition(".held.")
        m = model.get_submodule(name)
        if not isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            m = LoRALinear(m)
            setattr(model.get_submodule(parent), child, m)
        m.held.append(Held(state[key], state[key[:-1] + "B"]))
    return model


def held_order(key):
    """name.held.N.A -> (name, N): each projection's held adapters in the order they were trained."""
    name, _, rest = key.rpartition(".held.")
    return name, int(rest.split(".")[0])


def merge(model):
    """Fold every adapter, held ones too, into its weights, in place: the plain model, equal to the
    adapted one up to float order in float32; in bf16 a lossy copy (LoRALinear.merged), which only
    --export-hf writes. A model without adapters is left as it is."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.merged())
    return model


@contextlib.contextmanager
def switched_off(model):
    """Inside: model computes its base, every adapter of its own disabled (held ones stay: they
    are the policy the stage started from)."""
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
    its own adapters off, the held ones on (no_grad: a frozen reference or reward model). head, if
    given, replaces a scalar model's own: the reward model is the critic's backbone with the reward
    model's head."""

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
