"""rssd_magic: a ``%%stateful`` cell magic that runs a Jupyter/IPython cell at
most once, recording its outputs and the names it bound in a surveilr RSSD
(a plain SQLite file), and replaying them on every later run.

Load it with ``%load_ext rssd_magic``.  The engine (``keys``, ``store``,
``serialize``, ``capture``) does not import IPython; ``magic`` is the adapter.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    """Called by ``%load_ext rssd_magic``: register ``%%stateful``."""
    from .magic import load

    load(ipython)


def unload_ipython_extension(ipython):
    """Called by ``%unload_ext rssd_magic``: close the RSSD connections."""
    from .magic import unload

    unload(ipython)
