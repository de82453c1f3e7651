"""Weight averaging: an EMA of the trainable weights, and checkpoint soups over the top epochs.

Both work on the trainable parameters only (by name, as in ``model.named_parameters()``):
frozen weights are the same in every member, and buffers (batch-norm statistics) are not
weights that an average of optimizer steps says anything about.
"""

from __future__ import annotations

import contextlib

import torch


def trainable_named(model):
    """``[(name, param)]`` of the trainable parameters, in ``named_parameters`` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model):
    """The trainable parameters as detached CPU copies (what a soup keeps per epoch)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in trainable_named(model)}


@torch.no_grad()
def load_trainable_(model, state):
    """Copy ``state`` (name -> tensor) into the model's trainable parameters, in place."""
    params = dict(trainable_named(model))
    for name, value in state.items():
        params[name].copy_(value)


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
    """The uniform average of trainable states (name -> tensor), in float64 then back to each dtype."""
    first = states[0]
    return {
        name: (sum(s[name].double() for s in states) / len(states)).to(first[name].dtype)
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
