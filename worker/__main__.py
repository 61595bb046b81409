"""`python -m worker`: the `agentless` command."""

from worker.cli.main import main

main()
