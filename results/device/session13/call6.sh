# Session 13, call 6 (one H200): `pytest -m gpu tests/` on the final commit.
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/gpu_tests_h200.log 2>&1
echo "tests rc $?"; tail -n 4 $OUT/gpu_tests_h200.log
