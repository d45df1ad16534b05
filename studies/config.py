"""Study sizes, chosen once per run from the environment.

QUIVER_SMOKE=1  tiny sizes: the test suite runs every study this way (seconds).
QUIVER_FULL=1   full sizes (``make report FULL=1``).
neither         quick sizes: ``make report`` finishes in about 15 minutes on 2 cores.
"""

from __future__ import annotations

import os

SMOKE = os.environ.get("QUIVER_SMOKE") == "1"
FULL = os.environ.get("QUIVER_FULL") == "1" and not SMOKE
MODE = "smoke" if SMOKE else ("full" if FULL else "quick")


def pick(*, smoke, quick, full):
    """The value for this run's mode."""
    return {"smoke": smoke, "quick": quick, "full": full}[MODE]
