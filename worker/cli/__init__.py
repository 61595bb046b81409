"""The `agentless` command: the parser and composition root, submit, the operator reports, tables
and dead letters.
"""
