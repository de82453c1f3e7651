"""What each ``mmcore`` command does, as plain functions (no click): run, evaluate, predict, compare, sweep."""
