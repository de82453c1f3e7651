"""Which weights a run ends with: one :class:`Selection` object.

After each epoch's validation the candidates are the raw weights and, with ``train.ema``, the EMA
weights (validated alike; ties go to the raw ones). The better candidate competes with the best
epoch so far on ``train.early_stopping.metric``; with ``train.soup`` every candidate is also offered
to the soup pool, the top ``soup_k`` epochs' weights kept on the CPU; at the end the pool is
averaged (uniformly, or greedily by validation) into the selected model. Patience counts the
epochs since the best. The whole state round-trips through ``last.ckpt``.
"""

from __future__ import annotations

from mmcore.engine.averaging import average_states, greedy_soup


def metric_mode(metric):
    """Losses are minimized, everything else maximized."""
    return "min" if metric.endswith("loss") or metric.endswith("brier") or metric.endswith("ece") else "max"


def better_in(mode):
    """``better(new, old)``: strictly better in ``mode``; a missing value is never better, anything beats none."""

    def better(new, old):
        if new is None:
            return False
        return old is None or (new > old if mode == "max" else new < old)

    return better


class Selection:
    """The best epoch, its weights (``raw`` or ``ema``), patience and the soup pool of one run."""

    def __init__(self, metric, *, soup="none", soup_k=1):
        self.metric = metric
        self.better = better_in(metric_mode(metric))
        #: ``none``, ``uniform`` or ``greedy`` (``train.soup``) and the pool's size
        self.soup_method, self.soup_k = soup, soup_k
        self.best_value = None
        self.best_epoch = 0
        self.best_metrics = {}
        #: epochs validated since the best one
        self.since_best = 0
        #: which weights of the best epoch won: "raw" or "ema"
        self.selected_weights = "raw"
        #: the top ``soup_k`` (value, epoch, weights, trainable state on the CPU), best first
        self.soup_pool = []
        #: what results.json says about the soup, once made
        self.soup = None

    def offer(self, epoch, candidates, *, state_of):
        """An epoch's validated ``candidates`` (``[(weights, metrics)]``, raw first) -> ``(weights, metrics,
        improved)``: the better candidate, and whether it beats the best epoch so far (then it is the best).

        ``state_of(weights)``: the model's soup state under those weights (for the soup pool).
        """
        weights, metrics = candidates[0]
        for kind, candidate in candidates[1:]:  # ties go to the raw weights
            if self.better(candidate[self.metric], metrics[self.metric]):
                weights, metrics = kind, candidate
        if self.soup_method != "none":
            for kind, candidate in candidates:
                self._offer_to_soup(candidate[self.metric], epoch, kind, state_of)
        improved = self.better(metrics[self.metric], self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.best_metrics = metrics[self.metric], epoch, metrics
            self.selected_weights = weights
            self.since_best = 0
        else:
            self.since_best += 1
        return weights, metrics, improved

    def patience_spent(self, patience):
        """Early stopping: ``patience`` epochs (0: never) without improvement."""
        return bool(patience) and self.since_best >= patience

    def _offer_to_soup(self, value, epoch, kind, state_of):
        """Keep this epoch's ``kind`` weights if they are among the top ``soup_k``."""
        if value is None:
            return
        pool = self.soup_pool
        place = next((i for i, entry in enumerate(pool) if self.better(value, entry["value"])), len(pool))
        if place >= self.soup_k:
            return
        pool.insert(place, {"value": value, "epoch": epoch, "weights": kind, "state": state_of(kind)})
        del pool[self.soup_k:]

    @property
    def makes_soup(self):
        return self.soup_method != "none" and bool(self.soup_pool)

    def make_soup(self, validate):
        """Average the pooled epochs (uniform, or greedily by validation) -> ``(state, metrics)``: the soup,
        now the selected model. ``validate(state)`` loads a state into the model and returns its metrics."""
        pool, metric = self.soup_pool, self.metric
        states = [entry["state"] for entry in pool]
        if self.soup_method == "greedy":
            soup, chosen, metrics = greedy_soup(states, validate, lambda new, old: self.better(new[metric], old[metric]))
        else:
            soup, chosen = average_states(states), list(range(len(states)))
            metrics = validate(soup)
        self.best_metrics = metrics
        self.soup = {
            "method": self.soup_method,
            "k": self.soup_k,
            "members": [{"epoch": pool[i]["epoch"], "weights": pool[i]["weights"], metric: pool[i]["value"]} for i in chosen],
            "candidates": [{"epoch": e["epoch"], "weights": e["weights"], metric: e["value"]} for e in pool],
            "val": metrics,
        }
        return soup, metrics

    def state_dict(self):
        """What ``last.ckpt`` keeps of the selection."""
        return {
            "best": {"value": self.best_value, "epoch": self.best_epoch, "metrics": self.best_metrics},
            "since_best": self.since_best,
            "selected_weights": self.selected_weights,
            "soup_pool": self.soup_pool,
        }

    def load_state_dict(self, state):
        best = state["best"]
        self.best_value, self.best_epoch, self.best_metrics = best["value"], best["epoch"], best["metrics"]
        self.since_best = state["since_best"]
        self.selected_weights = state.get("selected_weights", "raw")
        self.soup_pool = list(state.get("soup_pool", []))
