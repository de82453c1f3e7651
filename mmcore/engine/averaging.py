"""Weight averaging: an EMA of the trainable weights, and checkpoint soups over the top epochs.

Both work on the trainable parameters (by name, as in ``model.named_parameters()``; frozen
weights are the same in every step) and on the buffers the state dict saves. The EMA follows
the batch-norm statistics like the weights. A soup member is an epoch's trainable parameters
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


def saved_buffers(model):
    """``[(name, buffer)]`` of the buffers the state dict saves (not a non-persistent one)."""
    saved = model.state_dict(keep_vars=True).keys()
    return [(name, b) for name, b in model.named_buffers() if name in saved]


def soup_named(model):
    """``[(name, tensor)]`` of what a soup averages: the trainable parameters, then the
    buffers the state dict saves (batch-norm running statistics and counters)."""
    return trainable_named(model) + saved_buffers(model)


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

    The trainable weights and the floating-point buffers the state dict saves (batch-norm
    running statistics) follow the average alike, as in timm's ``ModelEmaV3`` and torch's
    ``AveragedModel(use_buffers=True)``: the EMA weights are validated under statistics that
    match them, not under the raw weights' latest ones. The update is one fused
    ``_foreach_lerp_`` (no host sync); the shadow starts as the weights the run starts from.
    """

    def __init__(self, model, decay):
        self.decay = float(decay)
        named = trainable_named(model)
        buffers = [(name, b) for name, b in saved_buffers(model) if b.is_floating_point()]
        self.weight_names = [name for name, _ in named]
        self.names = self.weight_names + [name for name, _ in buffers]
        self.params = [t for _, t in named] + [b for _, b in buffers]
        self.shadow = [t.detach().clone() for t in self.params]

    @torch.no_grad()
    def update(self):
        """One EMA step towards the current weights (and statistics)."""
        if self.params:
            torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.decay)

    def state_dict(self):
        """The shadow weights and statistics by name, on the CPU (for ``last.ckpt``)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Restore the shadow saved by :meth:`state_dict` (exactly).

        Statistics a checkpoint lacks (one written before the EMA followed them) start from
        the model's current ones; a missing weight is an error.
        """
        missing = sorted(set(self.weight_names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights (e.g. {missing[0]})")
        for name, t, current in zip(self.names, self.shadow, self.params):
            t.copy_(state[name] if name in state else current)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the EMA weights and statistics inside the block, its own again after it."""
        with torch.no_grad():
            backup = [t.detach().clone() for t in self.params]
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
