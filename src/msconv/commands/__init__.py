"""Sub-commands of the `msconv` CLI, one module each (see msconv/cli.py)."""
