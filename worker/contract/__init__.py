"""The wire contract and the pure rules: models, criteria, tokens, retries, judging and events.

Nothing here does I/O or imports asyncpg, aio-pika or aiohttp.
"""
