"""Training checkpoints: atomic, verified saves (store.py), their manifest (manifest.py) and the
check that a checkpoint may be resumed under a config (compat.py)."""
