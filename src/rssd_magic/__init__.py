"""rssd_magic: a ``%%stateful`` cell magic that runs a Jupyter/IPython cell at
most once, recording its outputs and the names it bound in a surveilr RSSD
(a plain SQLite file) or on a PostgreSQL server, and replaying them on every
later run.

Load it with ``%load_ext rssd_magic``; the command line is ``rssd-magic``
(``cli``, also ``python -m rssd_magic``).  ``adapters`` is the only code
that imports IPython or click; ``engine`` runs one cell, ``records`` is what
a run leaves and whether it may act, ``output`` records what a cell shows,
``manage`` answers the commands, ``store`` is a store written once over the
``backends`` (SQLite, PostgreSQL); ``deps`` and ``sql`` are what a cell
reads and its SQL.  README.md's "Layout" and "Architecture" walk through
them.
"""

# 0.2: records signed whole; one key scope per store; claims with fencing
# tokens (our schema version 3); PostgreSQL backend.
__version__ = "0.2.0"


def load_ipython_extension(ipython):
    """Called by ``%load_ext rssd_magic``: register ``%%stateful``."""
    from .adapters.magic import load

    load(ipython)


def unload_ipython_extension(ipython):
    """Called by ``%unload_ext rssd_magic``: close the RSSD connections."""
    from .adapters.magic import unload

    unload(ipython)
