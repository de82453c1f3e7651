"""The smallest real recipe (fake encoders, 1 epoch); tests override only what they are about."""

from mmcore.recipe import deep_merge

TINY_RECIPE = {
    "experiment": "tiny",
    "seed": 3,
    "data": {"num_workers": 0},
    "vision": {"name": "fake_cnn", "params": {"width": 8}},
    "text": {"name": "fake_text"},
    "pooling": {"name": "mean"},
    "fusion": {"name": "gated", "params": {"dim": 16}},
    "head": {"name": "mlp", "params": {"hidden": [16]}},
    "train": {"epochs": 1, "batch_size": 16, "learning_rate": 0.003},
    "logging": {"progress": False},
}


def tiny_recipe_data(data_dir, **tables):
    """TINY_RECIPE reading ``data_dir``, with ``tables`` deep-merged in (plain data, for tomli_w)."""
    return deep_merge(deep_merge(TINY_RECIPE, {"data": {"base_dir": str(data_dir)}}), tables)
