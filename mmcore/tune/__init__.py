"""``mmcore tune``: hyperparameter search on Optuna (the space in :mod:`.space`, the study in :mod:`.study`)."""
