"""Sub-commands of the `msconv` CLI, one module each (see msconv_cli/__init__.py)."""
