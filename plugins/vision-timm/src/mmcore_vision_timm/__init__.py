"""Any timm model as an mmcore vision encoder: ``name = "timm"`` with ``params.model_name``.

Tokens come from timm's ``forward_features``: a transformer's token sequence as is (prefix
tokens first; ``has_cls_token`` when the model has a class token), a CNN's feature map as
H*W tokens. ``tiny = true`` builds a miniature of the model's own family for tests
(vision_transformer, deit, resnet, convnext). timm is imported by the factory.
"""

import attrs

from mmcore import EncoderParams, MmcoreError, VisionTraits, build_timm_encoder, did_you_mean, hookimpl, timm_weights

DEFAULT_MODEL = "convnext_base.fb_in22k_ft_in1k"


def _non_empty(instance, attribute, value):
    if not value.strip():
        raise ValueError("must name a timm model, e.g. 'convnext_base.fb_in22k_ft_in1k'")


@attrs.frozen(kw_only=True)
class TimmParams(EncoderParams):
    """``model_name``: any ``timm.list_models()`` name, optionally with a pretrained tag."""

    model_name: str = attrs.field(default=DEFAULT_MODEL, validator=_non_empty)


def check_model_name(model_name):
    """Raise a one-line error when timm does not know ``model_name``."""
    import timm

    if model_name.startswith(("hf-hub:", "local-dir:")):
        return  # timm reads the architecture from the repo's / folder's config.json
    architecture = timm.models.split_model_name_tag(model_name)[0]
    if not timm.is_model(architecture):
        hint = did_you_mean(architecture, timm.list_models())
        raise MmcoreError(
            f"vision encoder 'timm': params.model_name: unknown timm model {model_name!r}{hint}; "
            "see timm.list_models()"
        )


def build_timm(params):
    """Build the ``timm`` encoder for ``params.model_name``."""
    check_model_name(params.model_name)
    return build_timm_encoder("timm", params.model_name, params)


def timm_model_weights(params):
    """The pretrained weights of ``params.model_name`` (``params.weights`` replaces them)."""
    return timm_weights(params, params.model_name)


@hookimpl
def register_vision_encoders(register):
    # has_cls_token depends on the model: left to the built encoder
    register("timm", build_timm, TimmParams, traits=VisionTraits(has_cls_token=None), weights=timm_model_weights)
