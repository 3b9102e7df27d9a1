"""l4lb: an L4 (TCP) load balancer whose hot path is compiled with Cython and runs on uvloop."""

__version__ = "0.2.0"

import sys as _sys

from .signals import catch_for_run as _catch_for_run

# First, before the imports below take their ~0.2 s: a SIGHUP during `l4lb run`'s start
# is kept for later instead of killing the process (see l4lb/signals.py).
_catch_for_run(_sys.argv)

try:
    from . import _native  # noqa: F401  (the compiled hot path; there is no slow fallback)
except ImportError as exc:  # pragma: no cover - exercised by hand on a source tree
    raise ImportError(
        "l4lb's compiled extension l4lb._native is missing or broken "
        f"({exc}). Build it with `pip install -e .` (or `python setup.py build_ext "
        "--inplace`) from the source tree; l4lb has no pure-Python data path."
    ) from exc
