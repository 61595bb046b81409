"""PostgreSQL: the store, its statements, the schema and its migrations, the batcher and the
worker registry. asyncpg.Record never leaves this package.
"""
