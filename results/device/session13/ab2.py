"""Session 13 experiment: VARIANT cur (commit 43dd748's engine: the ViT blocks as written) or new (the
working tree: each ViT residual add + the LayerNorm after it as one kernel), in the whole model's stage
timings. Usage: python ab2.py VARIANT <flexvlm-profile args...>."""
import sys

import flexvlm_env.model.vision as vision
from flexvlm_env.profiles.cli import main

variant = sys.argv[1].rstrip("0123456789")
if variant == "cur":
    vision.fused_add_norm_ok = lambda x, weight: False
elif variant != "new":
    raise SystemExit(f"unknown variant {sys.argv[1]}")
main(sys.argv[2:])
