"""Session 12 experiment: the prefill tile table's 16-row bound, measured in the whole model's prefill.
Usage: python prefill_bound.py VARIANT <flexvlm-profile args...>; VARIANT b16 (shipped: 16-row blocks up
to 16 pairs per expert), b8, b4, b0 (never 16-row blocks)."""
import sys

import flexvlm_env.model.moe_kernels as mk
from flexvlm_env.profiles.cli import main

base = mk._PREFILL_CONFIGS["H100"]
small, mid, big = base[16], base[96], base[None]
tables = {"b16": base, "b8": {8: small, 96: mid, None: big}, "b4": {4: small, 96: mid, None: big},
          "b0": {96: mid, None: big}}
mk._PREFILL_CONFIGS["H200"] = tables[sys.argv[1].rstrip("r")]
main(sys.argv[2:])
