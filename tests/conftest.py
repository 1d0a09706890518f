"""Suite-wide: `train.precision: auto` (the default) resolves to fp32 in tests.

Machines of this kind differ (with AMX, auto picks bf16; without, fp32), and the equivalence
tests compare fp32 runs to 1e-5. `MEGADS_PRECISION_AUTO` pins what auto resolves to (it is a
documented user setting); the tests of auto's own measurement and choice remove it
(tests/train/test_precision.py). Set here, so every rank a test launches inherits it.
"""
import os

os.environ["MEGADS_PRECISION_AUTO"] = "fp32"
