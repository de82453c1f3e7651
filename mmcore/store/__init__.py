"""Everything on disk that outlives a run: the one file lock, the sweep of killed writes, the cache's tenants.

This layer sits above the bottom one (``plugins/ builtin/ kit/ interfaces errors io validators``;
``mmcore.io`` holds the one atomic writer) and below ``data/ model/ recipe/ rundir``; it imports
nothing above it. Import the modules themselves (nothing is re-exported here, so taking the lock
does not import numpy):

- :mod:`~mmcore.store.locks` (``FileLock``, ``file_lock``, ``process_alive``) and
  :mod:`~mmcore.store.leftovers` (``sweep_leftovers``, ``is_leftover``);
- the cache directory: :mod:`~mmcore.store.root` (where it is, how it fails),
  :mod:`~mmcore.store.space` (disk space), :mod:`~mmcore.store.keys` (content keys);
- its tenants, declared in :mod:`~mmcore.store.tenants` (``TENANTS``, ``verify_cache``,
  ``tenants_info``, ``clear_cache``): features (:mod:`~mmcore.store.features`,
  :mod:`~mmcore.store.chunks`, :mod:`~mmcore.store.tokens`, :mod:`~mmcore.store.spaces`), file
  facts (:mod:`~mmcore.store.records`, :mod:`~mmcore.store.facts`), OCR texts
  (:mod:`~mmcore.store.ocr`), shard indexes and copied shards (written by
  :mod:`mmcore.data.webdataset`).
"""
