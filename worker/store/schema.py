"""The database schema: numbered migrations (migrations/*.sql), applied in order at start-up."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from worker.contract.errors import ConfigError

log = logging.getLogger(__name__)

# Fixed key of the advisory lock that serialises migrations of one database.
_MIGRATION_LOCK = 0x6167_6C73
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("worker.store.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append(Migration(version, entry.name, entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(
    conn: asyncpg.Connection | PoolConnectionProxy, *, up_to: int | None = None
) -> str:
    """Bring the schema up to date (or to version `up_to`: an older schema, to upgrade from)
    and return its name. Safe when many processes start at once: each waits for the lock, then
    re-reads the version another may have just applied."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        schema: str | None = await conn.fetchval("SELECT current_schema()")
        if schema is None:
            path: str = await conn.fetchval("SELECT current_setting('search_path')")
            schema = path.split(",", maxsplit=1)[0].strip().strip('"')
            if not _SCHEMA_NAME.fullmatch(schema):
                raise ConfigError(f"search_path names an unusable schema: {schema!r}")
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        for migration in migrations():
            if migration.version > current and (up_to is None or migration.version <= up_to):
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                log.info("migration applied", extra={"migration": migration.name})
    return schema
