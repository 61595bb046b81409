"""The wire contract and the pure rules: settings, models, typed records, criteria, judging,
events, macros, tokens and retries.

Nothing here does I/O or imports asyncpg, aio-pika or aiohttp (pyproject.toml's import contracts).
"""
