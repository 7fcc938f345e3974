# Runs tests/_lm_gpu_interpret_check.py against the 3-D variant (module swapped in before the check imports it)
import sys, importlib.util
spec = importlib.util.spec_from_file_location("agents.lm_gpu", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules["agents.lm_gpu"] = m; spec.loader.exec_module(m)
sys.path.insert(0, "tests"); sys.argv = sys.argv[:1]
import _lm_gpu_interpret_check as c
sys.exit(c.main())
