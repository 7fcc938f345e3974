"""Session 13 experiment: the H200 prefill tile for > 96 pairs per expert, measured in the whole model.
Usage: python prefill_tiles.py VARIANT <flexvlm-profile args...>."""
import sys

import flexvlm_env.model.moe_kernels as mk
from flexvlm_env.model.moe_kernels import PrefillConfig as C
from flexvlm_env.profiles.cli import main

big = {"c0": C(128, 64, 64, 8, 3), "c1": C(128, 128, 64, 8, 4), "c2": C(64, 128, 64, 8, 4),
       "c3": C(128, 128, 64, 8, 3), "c4": C(128, 64, 64, 4, 4), "c5": C(64, 64, 64, 4, 4)}
name = sys.argv[1].rstrip("r")
mk._PREFILL_CONFIGS["H200"] = {96: mk._PREFILL_CONFIGS["H200"][96], None: big[name]}
main(sys.argv[2:])
