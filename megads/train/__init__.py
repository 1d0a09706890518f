"""Training: the loop (trainer.py), optimizer and schedule, checkpoints, metrics, launch."""
