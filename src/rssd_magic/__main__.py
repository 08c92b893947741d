"""``python -m rssd_magic …``: the ``rssd-magic`` command line (see :mod:`rssd_magic.cli`)."""

from .cli import main

main(prog_name="rssd-magic")
