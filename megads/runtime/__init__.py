"""Process-level concerns of a run: signals (graceful stop) and the output-dir lock / run id."""
