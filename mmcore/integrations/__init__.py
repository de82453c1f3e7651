"""Ways in from the data engines users already run: :mod:`.batches` scores a Ray Data or Spark job's
batches with a run or bundle through the one scoring path (docs/distributed.md, "Scoring at scale")."""
