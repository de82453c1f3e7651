"""Multimodal fusions: ``gated`` (Gated Multimodal Unit), ``concat`` and ``late`` (one head per modality).

Each is a :class:`mmcore.interfaces.Fusion` and says everything through its
:class:`~mmcore.interfaces.FusionOutput`: the GMU its gate, late fusion its per-modality logits.
"""

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.builtin.heads import ACTIVATIONS, MlpHead, _positive_sizes
from mmcore.interfaces import AuxiliaryLogits, Fusion, FusionOutput, NoParams
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import FieldError, at_least, in_range, one_of, positive


@attrs.frozen(kw_only=True)
class GatedParams:
    """``dim``: width of the fused vector; ``bias``: affine (True) or purely linear maps."""

    dim: int = attrs.field(default=512, validator=positive)
    bias: bool = True


class GatedMultimodalUnit(Fusion):
    """GMU (Arevalo et al. 2017).

    h_v = tanh(W_v x_v), h_t = tanh(W_t x_t), z = sigmoid(W_z [x_v; x_t]),
    h = z * h_v + (1 - z) * h_t. The gate ``z`` (detached) is the output's ``gate``, so a run
    can report how much each sample leaned on the image.
    """

    def __init__(self, vision_dim, text_dim, dim=512, bias=True):
        super().__init__()
        self.out_dim = dim
        self.vision = nn.Linear(vision_dim, dim, bias=bias)
        self.text = nn.Linear(text_dim, dim, bias=bias)
        self.gate = nn.Linear(vision_dim + text_dim, dim, bias=bias)

    def forward(self, vision, text):
        h_vision = torch.tanh(self.vision(vision))
        h_text = torch.tanh(self.text(text))
        z = torch.sigmoid(self.gate(torch.cat([vision, text], dim=-1)))
        return FusionOutput(z * h_vision + (1 - z) * h_text, gate=z.detach())


def build_gated(params, vision_dim, text_dim):
    return GatedMultimodalUnit(vision_dim, text_dim, dim=params.dim, bias=params.bias)


class ConcatFusion(Fusion):
    """L2-normalize each modality, then concatenate."""

    def __init__(self, vision_dim, text_dim):
        super().__init__()
        self.out_dim = vision_dim + text_dim

    def forward(self, vision, text):
        return FusionOutput(torch.cat([F.normalize(vision, dim=-1), F.normalize(text, dim=-1)], dim=-1))


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


class LateFusion(Fusion):
    """L2-normalise each modality, score it with its own head: ``fused`` [B, 2] = (image logit, text logit).

    The recipe's head (``mlp`` with ``hidden = []``: a learned weighted sum) turns the two
    logits into one, and starts as their plain sum (:meth:`init_head`). In training the two
    logits are also the output's ``aux_logits`` (weighted ``aux_weight``, when > 0), so each
    branch learns to classify by itself; with ``detach`` the head sees them detached, so the
    fused logit's loss trains only the combination.
    """

    out_dim = 2

    def __init__(self, vision_dim, text_dim, hidden=(), dropout=0.0, activation="gelu", aux_weight=1.0, detach=True):
        super().__init__()
        self.vision = MlpHead(vision_dim, hidden=hidden, dropout=dropout, activation=activation)
        self.text = MlpHead(text_dim, hidden=hidden, dropout=dropout, activation=activation)
        self.aux_weight = aux_weight
        self.detach = detach

    def forward(self, vision, text):
        logits = torch.stack(
            [self.vision(F.normalize(vision, dim=-1)), self.text(F.normalize(text, dim=-1))], dim=-1
        )
        if not self.training:  # scoring, and saliency, which needs the graph through the branches
            return FusionOutput(logits)
        aux = AuxiliaryLogits(self.aux_weight, logits.unbind(-1)) if self.aux_weight > 0 else None
        return FusionOutput(logits.detach() if self.detach else logits, aux_logits=aux)

    @torch.no_grad()
    def init_head(self, head):
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
