"""``python -m synthvox`` runs the command line (same as the ``synthvox`` script)."""

from synthvox.cli import main

main()
