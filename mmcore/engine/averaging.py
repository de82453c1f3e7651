"""Weight averaging: an EMA of the trainable weights, and checkpoint soups over the top epochs.

The EMA works on the trainable parameters only (by name, as in ``model.named_parameters()``):
frozen weights are the same in every step. A soup member is an epoch's trainable parameters
*and* its buffers (batch-norm statistics), averaged alike: weights averaged
under another epoch's statistics are not the model any epoch validated, so without them a
one-member soup of a network with batch norm would not even be its best epoch.
"""

from __future__ import annotations

import contextlib

import torch


def trainable_named(model):
    """``[(name, param)]`` of the trainable parameters, in ``named_parameters`` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def soup_named(model):
    """``[(name, tensor)]`` of what a soup averages: the trainable parameters, then the
    buffers the state dict saves (batch-norm running statistics and counters)."""
    saved = model.state_dict(keep_vars=True).keys()
    buffers = [(name, b) for name, b in model.named_buffers() if name in saved]
    return trainable_named(model) + buffers


def soup_state(model):
    """What a soup keeps of an epoch (:func:`soup_named`), as detached CPU copies."""
    return {name: t.detach().to("cpu", copy=True) for name, t in soup_named(model)}


@torch.no_grad()
def load_soup_state_(model, state):
    """Copy ``state`` (name -> tensor, from :func:`soup_state`) into the model, in place."""
    tensors = dict(soup_named(model))
    for name, value in state.items():
        tensors[name].copy_(value)


class WeightEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step, on the weights' device.

    The update is one fused ``_foreach_lerp_`` (no host sync); the shadow starts as the
    weights the run starts from.
    """

    def __init__(self, model, decay):
        self.decay = float(decay)
        named = trainable_named(model)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        """One EMA step towards the current weights."""
        if self.params:
            torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.decay)

    def state_dict(self):
        """The shadow weights by name, on the CPU (for ``last.ckpt``)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Restore the shadow weights saved by :meth:`state_dict` (exactly)."""
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights (e.g. {missing[0]})")
        for name, t in zip(self.names, self.shadow):
            t.copy_(state[name])

    @contextlib.contextmanager
    def applied(self):
        """The model holds the EMA weights inside the block, its own weights again after it."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, backup)


def average_states(states):
    """The uniform average of soup states (name -> tensor), in float64 then back to each dtype;
    an integer tensor (a batch counter) is the first state's."""
    first = states[0]
    return {
        name: (sum(s[name].double() for s in states) / len(states)).to(first[name].dtype)
        if first[name].is_floating_point() else first[name].clone()
        for name in first
    }


def greedy_soup(members, evaluate, better):
    """Wortsman et al.'s / AutoGluon's greedy soup.

    ``members``: states, best first. A member joins the soup only if the soup with it
    validates better (``better(new, old)``) than the soup without it; so the result is never
    worse on validation than ``members[0]``. ``evaluate(state) -> value``. Returns
    ``(soup state, indices of the members in it, its value)``.
    """
    chosen = [0]
    soup = members[0]
    value = evaluate(soup)
    for i in range(1, len(members)):
        candidate = average_states([members[j] for j in chosen] + [members[i]])
        candidate_value = evaluate(candidate)
        if better(candidate_value, value):
            chosen.append(i)
            soup, value = candidate, candidate_value
    return soup, chosen, value
