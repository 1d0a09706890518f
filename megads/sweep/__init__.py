"""Scaling sweeps (`megads sweep`): many ordinary training runs from one base config, their results
table, loss-vs-compute and compute-optimal fits, and plots; and the run report (`megads plot`).
Sits above train/, like the recipe: every point is a `megads train` process."""
