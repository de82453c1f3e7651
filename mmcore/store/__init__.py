"""Everything on disk that outlives a run: atomic writes' leftovers, the one file lock, the cache's tenants.

This layer sits above the bottom one (``plugins/ builtin/ kit/ interfaces errors io validators``)
and below ``data/ model/ recipe/ rundir``; it imports nothing above it.
"""
