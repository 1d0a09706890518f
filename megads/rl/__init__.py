"""Reinforcement learning on the parallel model: GRPO loss and advantages (loss.py), rollouts from
the policy in its own layout (rollout.py), rule rewards (rewards.py), the code sandbox
(sandbox.py), task generators (tasks.py), rejection sampling (rejection.py) and the R1 recipe in
miniature (recipe.py). Used by megads/train/objectives/grpo.py."""
from megads.rl.loss import AGGREGATIONS, group_advantages, grpo_loss

__all__ = ["AGGREGATIONS", "group_advantages", "grpo_loss"]
