"""``python -m edgepack.cli`` runs the ``edgepack`` command."""

from edgepack.cli import main

main()
