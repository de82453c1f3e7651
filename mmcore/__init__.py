"""mmcore: train binary classifiers of ad images from the image and its OCR text.

This module has two faces, as llm's ``llm.get_model(...)`` and ``llm.hookimpl`` share one module.
The Python API (:mod:`mmcore.api`, docs/python-api.md)::

    import mmcore
    run = mmcore.train("recipes/demo.toml", overrides={"train.epochs": 5})
    model = mmcore.load(run.dir)            # a run directory or an export bundle
    scores = model.predict(df)              # a DataFrame of paths, bytes or PIL images, or a CSV path

and the face plugin authors use, as ``from llm import Model, hookimpl`` is llm's::

    from mmcore import EncoderParams, VisionEncoder, TokenOutput, VisionTraits, hookimpl

Everything a user or a plugin needs is importable from here; the modules behind these names are
private and may move. Contract checks for a plugin's own tests live in :mod:`mmcore.testing`.
Names are imported on first use, so ``import mmcore`` stays cheap.
"""

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_FACE = {
    # the Python API: train, load a run or a bundle, predict, evaluate, export
    "train": "mmcore.api",
    "load": "mmcore.api",
    "Model": "mmcore.api",
    "Run": "mmcore.api",
    "Prediction": "mmcore.api",
    "Evaluation": "mmcore.api",
    "make_demo_data": "mmcore.api",
    "DataError": "mmcore.errors",
    "RunError": "mmcore.errors",
    # hooks
    "hookimpl": "mmcore.plugins.hookspecs",
    # the interfaces a plugin implements
    "VisionEncoder": "mmcore.interfaces",
    "TextEncoder": "mmcore.interfaces",
    "HostFeaturizer": "mmcore.interfaces",
    "OcrEngine": "mmcore.interfaces",
    "TokenOutput": "mmcore.interfaces",
    "Pooling": "mmcore.interfaces",
    "Fusion": "mmcore.interfaces",
    "FusionOutput": "mmcore.interfaces",
    "AuxiliaryLogits": "mmcore.interfaces",
    "Head": "mmcore.interfaces",
    "ModelOutput": "mmcore.interfaces",
    # traits a component declares when it registers: register(name, factory, params_cls, traits=...)
    "VisionTraits": "mmcore.plugins.traits",
    "AugmentationTraits": "mmcore.plugins.traits",
    "Preprocessing": "mmcore.interfaces",
    "EncoderParams": "mmcore.interfaces",
    "NoParams": "mmcore.interfaces",
    "NoWeightsParams": "mmcore.interfaces",
    "NO_WEIGHTS": "mmcore.interfaces",
    "identity_string": "mmcore.interfaces",
    "channel_constants": "mmcore.interfaces",
    # params checks and errors
    "FieldError": "mmcore.validators",
    "at_least": "mmcore.validators",
    "at_least_field": "mmcore.validators",
    "in_range": "mmcore.validators",
    "one_of": "mmcore.validators",
    "positive": "mmcore.validators",
    "MmcoreError": "mmcore.errors",
    "RecipeError": "mmcore.errors",
    "did_you_mean": "mmcore.errors",
    # weights
    "WeightsError": "mmcore.kit.weights",
    "WEIGHTS_HINT": "mmcore.kit.weights",
    "load_pretrained": "mmcore.kit.weights",
    "local_weights_hint": "mmcore.kit.weights",
    # what an encoder declares it loads: register(..., weights=fn), fn(params) -> [WeightRef | PartRef]
    "WeightRef": "mmcore.kit.weights",
    "PartRef": "mmcore.kit.weights",
    "hub_weights": "mmcore.kit.weights",
    "torchvision_weights": "mmcore.kit.weights",
    "timm_weights": "mmcore.kit.weights",
    # vision glue (torchvision / timm)
    "IMAGENET_MEAN": "mmcore.kit.vision",
    "IMAGENET_STD": "mmcore.kit.vision",
    "ResizeCropPreprocessing": "mmcore.kit.vision",
    "square_preprocessing": "mmcore.kit.vision",
    "torchvision_preprocessing": "mmcore.kit.vision",
    "timm_preprocessing": "mmcore.kit.vision",
    "calibrate_batchnorm": "mmcore.kit.vision",
    "FeatureMapEncoder": "mmcore.kit.vision",
    "TimmEncoder": "mmcore.kit.vision",
    "build_torchvision_model": "mmcore.kit.vision",
    "build_timm_model": "mmcore.kit.vision",
    "build_timm_encoder": "mmcore.kit.vision",
    "feature_map_tokens": "mmcore.kit.vision",
    "local_weights_file": "mmcore.kit.vision",
    "read_state_dict": "mmcore.kit.vision",
    "load_state_dict_into": "mmcore.kit.vision",
    # text glue (Hugging Face transformers / sentence-transformers)
    "TextEncoderParams": "mmcore.kit.text",
    "TextModelSpec": "mmcore.kit.text",
    "FrozenTextEncoder": "mmcore.kit.text",
    "build_text_encoder": "mmcore.kit.text",
}

__all__ = ["__version__", *_FACE]


def __getattr__(name):
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'mmcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
