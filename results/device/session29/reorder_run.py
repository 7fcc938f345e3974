"""Scratch: flexvlm-train grpo with the prompt's tokens reordered (ORDER env var), to test whether the budget
token's position changes how fast the policy learns to read it."""
import faulthandler, os, signal, sys

# `kill -USR1 PID` prints every thread's Python stack to stderr (call 2 looks for where a stalled run waits).
faulthandler.register(signal.SIGUSR1, all_threads=True)
import numpy as np
import agents.lm as lm

ORDER = os.environ.get("ORDER", "budget_last")
# columns of the original prompt: 0 <bos>, 1 family, 2 budget_fraction, 3 budget_ms, 4..13 other features, 14 config:
PERMS = {
    "budget_last": [0, 14, 1] + list(range(4, 14)) + [3, 2],
    "family_budget_last": [0, 14] + list(range(4, 14)) + [3, 1, 2],
    "budget_family_last": [0, 14] + list(range(4, 14)) + [3, 2, 1],
}
if ORDER != "none":
    perm = np.array(PERMS[ORDER])
    orig, orig_one = lm.prompt_ids, lm.prompt_ids_one
    lm.prompt_ids = lambda *a, **k: orig(*a, **k)[:, perm]
    lm.prompt_ids_one = lambda *a, **k: orig_one(*a, **k)[:, perm]
from trainers.cli import main
sys.exit(main())
