"""Classification heads: ``mlp`` (hidden layers -> one logit)."""

import attrs
from torch import nn

from mmcore.interfaces import Head
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import FieldError, in_range, one_of

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _positive_sizes(instance, attribute, value):
    bad = [size for size in value if size <= 0]
    if bad:
        raise FieldError(attribute.name, f"sizes must be > 0 (got {tuple(value)!r})")


@attrs.frozen(kw_only=True)
class MlpParams:
    """``hidden``: hidden layer sizes (``[]`` = a linear head); dropout after each hidden layer."""

    hidden: tuple[int, ...] = attrs.field(
        default=(512,), converter=tuple, validator=_positive_sizes
    )
    dropout: float = attrs.field(default=0.1, validator=in_range(0.0, 1.0))
    activation: str = attrs.field(default="gelu", validator=one_of(*ACTIVATIONS))


class MlpHead(Head):
    """Linear -> activation -> dropout per hidden size, then Linear to one logit."""

    def __init__(self, in_dim, hidden=(512,), dropout=0.1, activation="gelu"):
        super().__init__()
        layers = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features):
        return self.layers(features).squeeze(-1)


def build_mlp(params, in_dim):
    return MlpHead(
        in_dim, hidden=params.hidden, dropout=params.dropout, activation=params.activation
    )


@hookimpl
def register_heads(register):
    register("mlp", build_mlp, MlpParams)
