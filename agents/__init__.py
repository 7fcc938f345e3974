"""Controllers: one protocol (`agents.base.Controller`: `select_config(observation) -> Config`,
batched `select_indices`, pickle-free `save`/`load_controller`) and the methods behind it:
`lut`, `supervised`, `ppo` (SB3 PPO / sb3-contrib MaskablePPO), `lm` (DPO and GRPO with TRL).
Method modules are imported on use, so `import agents` pulls in neither SB3 nor TRL."""
from .base import Controller, RandomController, as_batch, load_controller, stack_observations

__all__ = ["Controller", "RandomController", "as_batch", "load_controller", "stack_observations"]
