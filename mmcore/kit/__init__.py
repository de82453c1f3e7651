"""Glue that encoder plugins share: torchvision/timm builders, Hugging Face text backends, weight loading.

Plugins import these through :mod:`mmcore`'s face, not from here.
"""
