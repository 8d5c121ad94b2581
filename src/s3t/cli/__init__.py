"""`s3t` command line: a thin shell over the library. Errors print one line and exit non-zero.

One module per concept: `run` (a run's lifecycle), `audit` (the audit, receipts and their verification),
`capacity` (planning), `service` (HTTP and tokens).
"""

# Importing a module registers its commands; this order is the order of `s3t --help`.
from . import run, audit, capacity, service  # noqa: F401, I001
from .common import app

__all__ = ["app"]
