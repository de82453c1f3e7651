"""Multimodal fusions: ``gated`` (Gated Multimodal Unit), ``concat`` and ``late`` (one head per modality)."""

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.builtin.heads import ACTIVATIONS, MlpHead, _positive_sizes
from mmcore.interfaces import NoParams
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import FieldError, at_least, in_range, one_of, positive


@attrs.frozen(kw_only=True)
class GatedParams:
    """``dim``: width of the fused vector; ``bias``: affine (True) or purely linear maps."""

    dim: int = attrs.field(default=512, validator=positive)
    bias: bool = True


class GatedMultimodalUnit(nn.Module):
    """GMU (Arevalo et al. 2017).

    h_v = tanh(W_v x_v), h_t = tanh(W_t x_t), z = sigmoid(W_z [x_v; x_t]),
    h = z * h_v + (1 - z) * h_t. The last gate is kept in ``last_gate`` (detached) so a run
    can report how much each sample leaned on the image.
    """

    def __init__(self, vision_dim, text_dim, dim=512, bias=True):
        super().__init__()
        self.out_dim = dim
        self.vision = nn.Linear(vision_dim, dim, bias=bias)
        self.text = nn.Linear(text_dim, dim, bias=bias)
        self.gate = nn.Linear(vision_dim + text_dim, dim, bias=bias)
        self.last_gate = None

    def forward(self, vision, text):
        h_vision = torch.tanh(self.vision(vision))
        h_text = torch.tanh(self.text(text))
        z = torch.sigmoid(self.gate(torch.cat([vision, text], dim=-1)))
        self.last_gate = z.detach()
        return z * h_vision + (1 - z) * h_text


def build_gated(params, vision_dim, text_dim):
    return GatedMultimodalUnit(vision_dim, text_dim, dim=params.dim, bias=params.bias)


class ConcatFusion(nn.Module):
    """L2-normalize each modality, then concatenate."""

    def __init__(self, vision_dim, text_dim):
        super().__init__()
        self.out_dim = vision_dim + text_dim

    def forward(self, vision, text):
        return torch.cat([F.normalize(vision, dim=-1), F.normalize(text, dim=-1)], dim=-1)


def build_concat(params, vision_dim, text_dim):
    return ConcatFusion(vision_dim, text_dim)


@attrs.frozen(kw_only=True)
class LateParams:
    """Late fusion: each modality's own head, then the recipe's head on the two logits.

    ``hidden``: hidden sizes of each modality's head (``[]`` = linear); ``dropout`` after each
    hidden layer; ``aux_weight``: weight of each modality's own loss, added in training to the
    loss of the fused logit (0 = the fused loss alone), so each branch learns to classify by itself;
    ``detach``: the fused logit's loss trains only the recipe's head (the combination), each
    branch learns from its own loss alone — so a combining weight that starts negative cannot
    push a branch the wrong way.
    """

    hidden: tuple[int, ...] = attrs.field(default=(), converter=tuple, validator=_positive_sizes)
    dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))
    activation: str = attrs.field(default="gelu", validator=one_of(*ACTIVATIONS))
    aux_weight: float = attrs.field(default=1.0, validator=at_least(0))
    detach: bool = True

    def __attrs_post_init__(self):
        if self.detach and self.aux_weight == 0:
            raise FieldError("aux_weight", "must be > 0 with detach = true (nothing would train the modality heads)")


class LateFusion(nn.Module):
    """L2-normalise each modality, score it with its own head: ``[B, 2]`` = (image logit, text logit).

    The recipe's head (``mlp`` with ``hidden = []``: a learned weighted sum) turns the two
    logits into one. ``aux_weight`` is read by the classifier, which keeps the two logits of a
    training forward for the per-modality losses (:meth:`Classifier.auxiliary_logits`).
    """

    out_dim = 2

    def __init__(self, vision_dim, text_dim, hidden=(), dropout=0.0, activation="gelu", aux_weight=1.0, detach=True):
        super().__init__()
        self.vision = MlpHead(vision_dim, hidden=hidden, dropout=dropout, activation=activation)
        self.text = MlpHead(text_dim, hidden=hidden, dropout=dropout, activation=activation)
        self.aux_weight = aux_weight
        #: read by the classifier: the head sees the two logits detached from the branches
        self.detach_combination = detach

    def forward(self, vision, text):
        return torch.stack(
            [self.vision(F.normalize(vision, dim=-1)), self.text(F.normalize(text, dim=-1))], dim=-1
        )

    @torch.no_grad()
    def initialize_head(self, head):
        """Start a linear combining head (``mlp`` with ``hidden = []``) as the plain sum of the two logits.

        A random init can give a modality a negative weight, and on a small training split the
        head may not recover before the epoch is selected; other heads keep their own init.
        """
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if len(linears) == 1 and linears[0].in_features == self.out_dim:
            linears[0].weight.fill_(1.0)
            if linears[0].bias is not None:
                linears[0].bias.zero_()


def build_late(params, vision_dim, text_dim):
    return LateFusion(
        vision_dim, text_dim, hidden=params.hidden, dropout=params.dropout,
        activation=params.activation, aux_weight=params.aux_weight, detach=params.detach,
    )


@hookimpl
def register_fusions(register):
    register("gated", build_gated, GatedParams)
    register("concat", build_concat, NoParams)
    register("late", build_late, LateParams)
