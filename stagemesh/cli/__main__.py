"""`python -m stagemesh.cli`: the `stagemesh` command (a contract, see DESIGN.md)."""

from stagemesh.cli.commands import main

main()
