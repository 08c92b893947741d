"""``rssd-magic``: the command line (also ``python -m rssd_magic``).

Its commands are commands.py's — the same ones, with the same options and
words, as ``%stateful`` in a notebook — run here on a terminal: a store is
opened read-only unless the command writes and is never created, answers
are aligned text or ``--json``, ``trust`` asks at a prompt, and a problem is
one line on stderr with exit status 1.  Importing it does not import
IPython.
"""

from __future__ import annotations

import sys

from .adapters.commands import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
