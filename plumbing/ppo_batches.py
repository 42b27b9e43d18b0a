"""PPO's batches as the machine runs them: the rows of the rollouts in forward passes planned on the
host (MicroBatch, host_plan), and the Learner, a model PPO trains with its optimizer, fp16 scaler and
gradient accumulation over micro-batches under DDP. ppo.py's loop reads the algorithm; this is what
runs its lines on a GPU without reading the device back.
"""
import contextlib

import torch

from model import positions, response_logprobs
from plumbing import distributed, packing
from training import backward, compiled, grad_scaler, optimizer_step


class MicroBatch:
    """Some rows of the rollouts, for one forward pass: their indices on the device, what the pass
    would otherwise read back from the device, found on the host (host_plan), and in an update the
    count its losses divide by (Rollouts.minibatch)."""

    def __init__(self, rollouts, rows, plan, response_at, n_tokens=None):
        self.rows, self.plan, self.response_at, self.n_tokens = rows, plan, response_at, n_tokens
        self.seq, self.attn, self.mask = rollouts.seq[rows], rollouts.attn[rows], rollouts.mask[rows]
        self.prompt_len = rollouts.prompt_len

    def logprobs(self, policy, temperature, entropy=False):
        """log pi(y_t) on the rows' response tokens (b, N), and their entropies (model.response_logprobs)."""
        return response_logprobs(policy, self.seq, self.attn, self.prompt_len, temperature, self.mask,
                                 entropy=entropy, plan=self.plan, response_at=self.response_at)

    def values(self, critic):
        """V(x, y_<t) before each response token (b, N)."""
        return critic(self.seq, self.attn, plan=self.plan)[:, self.prompt_len - 1:-1].float()


def host_plan(rollouts, rows, device):
    """What a forward pass over the rollouts `rows` (a host index tensor) would read back from the
    device, found on the host from their lengths: (its packing, packing.plan; the flat positions of
    its response tokens, model.response_logprobs)."""
    attn = rollouts.host_attn[rows]
    response = attn.bool()
    response[:, :rollouts.prompt_len] = False
    return packing.plan(attn, device).to(device), packing.to_device(positions(response), device)


class Learner:
    """A model PPO trains, the policy or the critic, with what its steps need: its micro-batch loss
    (the figure of that name checked for finiteness), optimizer and fp16 gradient scaler, and the
    module its forward passes run (wrap)."""

    def __init__(self, model, lr, loss, loss_name, cfg, device, dtype):
        self.model, self.forward, self.loss, self.loss_name = model, model, loss, loss_name
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.opt = model.configure_optimizers(lr, 0.0, device_type=torch.device(device).type)
        self.scaler = grad_scaler(device, dtype)

    def wrap(self, compile=False):
        """DDP(compile(model)) on purpose: see training.fit."""
        self.forward = distributed.wrap(compiled(self.model, compile))
        return self.forward

    def step(self, minibatch, it, reads, *targets):
        """One gradient step on a minibatch, accumulated over its micro-batches (each loss a token sum
        over the whole minibatch's count, so the parts add up to its loss), DDP reducing at the last
        part only; the figures, summed over the parts and checked when read, to reads (Figures)."""
        no_sync = getattr(self.forward, "no_sync", contextlib.nullcontext)
        figures = []
        for j, part in enumerate(minibatch):
            with (contextlib.nullcontext() if j == len(minibatch) - 1 else no_sync()):
                loss, row = self.loss(self.forward, part, *targets, self.cfg, self.device, self.dtype)
                backward(loss, self.scaler, it, check=False)
            figures.append((distributed.world_size(), row))
        norm = optimizer_step(None, self.opt, self.cfg.grad_clip, self.scaler, it, check=False)
        reads.add(it, figures, norm if self.scaler is None else None, loss=self.loss_name)
