"""rssd_magic: a ``%%stateful`` cell magic that runs a Jupyter/IPython cell at
most once, recording its outputs and the names it bound in a surveilr RSSD
(a plain SQLite file) or on a PostgreSQL server, and replaying them on every
later run.

Load it with ``%load_ext rssd_magic``.  The engine (``runner`` and what it
uses: ``backends``, ``keys``, ``record``, ``serialize``, ``capture`` …) does
not import IPython; ``magic`` (with ``body``, ``commands``, ``hooks``) and
``cli`` are the adapters.  README.md's "Architecture" walks through a run.
"""

# 0.2: records signed whole; one key scope per store; claims with fencing
# tokens (our schema version 3); PostgreSQL backend.
__version__ = "0.2.0"


def load_ipython_extension(ipython):
    """Called by ``%load_ext rssd_magic``: register ``%%stateful``."""
    from .magic import load

    load(ipython)


def unload_ipython_extension(ipython):
    """Called by ``%unload_ext rssd_magic``: close the RSSD connections."""
    from .magic import unload

    unload(ipython)
