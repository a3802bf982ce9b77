"""Loaded at interpreter start-up when this folder is on PYTHONPATH: a `python -m distil` subprocess of the
reliability tests gets the fault injector of fault_harness.py when DISTIL_TEST_FAULTS holds a plan."""

import os

if os.environ.get("DISTIL_TEST_FAULTS"):
    import fault_harness

    fault_harness.install_from_env()
