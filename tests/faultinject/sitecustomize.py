"""Test-only: imported at start-up by any Python whose PYTHONPATH holds this folder (see
tests/faultinject/__init__.py); installs FEATUREBEAM_FAULT_INJECT's directives in that process."""

import os

if os.environ.get("FEATUREBEAM_FAULT_INJECT"):
    from featurebeam import faults

    faults.install(os.environ["FEATUREBEAM_FAULT_INJECT"])
