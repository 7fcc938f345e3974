"""The experiment catalogue's logic (../shared/EXPERIMENTS.md): one module per experiment group.

The drivers in `scripts/` only parse arguments and call these modules; each module also has
`plot_from_results(results_dir) -> list[Path]`, so `scripts/make_figures.py` and the notebooks
rebuild every figure from the committed data alone.
"""
from __future__ import annotations

# experiment id -> module (imported lazily: some need torch or the model, plotting needs neither)
MODULES = {
    "e1": "flexvlm_env.experiments.latency_decomposition",
    "m2": "flexvlm_env.experiments.repeatability",
    "e2": "flexvlm_env.experiments.knob_coupling",
    "m1": "flexvlm_env.experiments.workloads",
    "e3": "flexvlm_env.experiments.latency_estimator",
    "e4": "flexvlm_env.experiments.system_eval",
    "e5": "flexvlm_env.experiments.training_strategies",
    "m3": "flexvlm_env.experiments.overhead",
    "m4": "flexvlm_env.experiments.budget_guardrail",
    "e6": "flexvlm_env.experiments.ablations",
    "m5": "flexvlm_env.experiments.mask_policy",
    "m6": "flexvlm_env.experiments.generalization",
    "lora": "flexvlm_env.experiments.lora",
}
