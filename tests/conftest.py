"""Suite-wide: `train.precision: auto` (the default) resolves to fp32 in tests.

Machines of this kind differ (with AMX, auto picks bf16; without, fp32), and the equivalence
tests compare fp32 runs to 1e-5. `MEGADS_PRECISION_AUTO` pins what auto resolves to (it is a
documented user setting); the tests of auto's own measurement and choice remove it
(tests/train/test_precision.py). Set here, so every rank a test launches inherits it.
"""
import os

os.environ["MEGADS_PRECISION_AUTO"] = "fp32"

# ------------------------------------------------------------------ running the suite in parallel
# `make test` runs the suite in two passes: every test not marked `serial` on two pytest-xdist
# workers (`-n 2 --dist loadfile`: a file's tests stay on one worker, so its module fixtures are
# built once), then the `serial` ones alone. A plain `pytest tests` runs everything in one
# process, as before. A test is `serial` when it bounds wall time, or touches machine-wide state
# that another worker's test would see or disturb:
SERIAL = {
    "rl/test_sandbox.py": "wall-time bounds; watches /tmp, mounts and the sandbox uids' processes",
    "rl/test_rewards.py": "the judge's deadlines and the code reward's sandbox",
    "parallel/test_faults.py": "a lost rank must end the others within parallel.timeout_s + 2 s",
    "parallel/test_multinode.py": "network namespaces and a veth pair",
    "parallel/test_launch.py": "MPI port discovery, mpiexec and launcher ports",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "serial: run outside the parallel pass of `make test` (see tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    from pathlib import Path

    import pytest

    tests = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().relative_to(tests).as_posix() in SERIAL:
            item.add_marker(pytest.mark.serial)
