"""``python -m zipmoe`` runs the command-line interface."""

from zipmoe.cli.app import main

main()
