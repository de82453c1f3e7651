"""Multimodal fusions: ``gated`` (Gated Multimodal Unit) and ``concat``."""

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.interfaces import NoParams
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import positive


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


@hookimpl
def register_fusions(register):
    register("gated", build_gated, GatedParams)
    register("concat", build_concat, NoParams)
