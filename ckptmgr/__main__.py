"""``python -m ckptmgr``: the ``ckptmgr`` command line (see :mod:`ckptmgr.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":  # not when imported (pytest's doctest collection imports it)
    sys.exit(main())
