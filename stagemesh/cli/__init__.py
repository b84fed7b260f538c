"""The front door: the `stagemesh` command (up, generate, status, bench, demo-model, certs) and
what only it uses (the launcher and supervisor of `up`, the bench driver, the status view, the demo
checkpoint). Services import the ground floor (`stagemesh.*` outside this package), never this."""

from stagemesh.cli.commands import main

__all__ = ["main"]
