"""SigLIP 2 vision encoders for mmcore: fixed resolution and NaFlex (native aspect ratio).

Importing this module is cheap: transformers is imported by the factories, when an encoder
is built.
"""

from functools import partial

import attrs

from mmcore import EncoderParams, VisionTraits, at_least, hookimpl, hub_weights

#: mmcore name -> Hugging Face hub id of the pretrained weights
HUB_IDS = {
    "siglip2_so400m": "google/siglip2-so400m-patch14-384",
    "siglip2_base": "google/siglip2-base-patch16-224",
    "siglip2_naflex_so400m": "google/siglip2-so400m-patch16-naflex",
    "siglip2_naflex_base": "google/siglip2-base-patch16-naflex",
}

FIXED_NAMES = ("siglip2_so400m", "siglip2_base")
NAFLEX_NAMES = ("siglip2_naflex_so400m", "siglip2_naflex_base")

#: 1024 patches of 16 px keep small print in an ad legible (a 4:3 ad becomes 576x432 px
#: instead of 288x224 px with the library's 256); the README explains the choice.
DEFAULT_MAX_NUM_PATCHES = 1024


@attrs.frozen(kw_only=True)
class Siglip2Params(EncoderParams):
    """Fixed-resolution SigLIP 2: the image is squashed to the checkpoint's square size."""


@attrs.frozen(kw_only=True)
class Siglip2NaflexParams(EncoderParams):
    """NaFlex SigLIP 2: the image keeps its aspect ratio and is cut into at most
    ``max_num_patches`` patches."""

    max_num_patches: int = attrs.field(default=DEFAULT_MAX_NUM_PATCHES, validator=at_least(1))


def _factory(name):
    def factory(params):
        """Build the ``{name}`` encoder from its params."""
        from .encoders import build_encoder

        return build_encoder(name, params)

    factory.__name__ = f"build_{name}"
    factory.__doc__ = factory.__doc__.format(name=name)
    return factory


@hookimpl
def register_vision_encoders(register):
    """The four SigLIP 2 encoders: two fixed-resolution, two NaFlex (whose preprocessing an
    export bundle stores as data: declared, so that the bundle can name it)."""
    from .naflex import NaflexPreprocessing

    traits = VisionTraits(has_cls_token=False)  # SigLIP has no CLS token (it pools with its own head)
    for name in FIXED_NAMES:
        register(name, _factory(name), Siglip2Params, traits=traits,
                 weights=partial(hub_weights, default_id=HUB_IDS[name]))
    for name in NAFLEX_NAMES:
        register(name, _factory(name), Siglip2NaflexParams, traits=traits,
                 weights=partial(hub_weights, default_id=HUB_IDS[name]), data_classes=(NaflexPreprocessing,))
