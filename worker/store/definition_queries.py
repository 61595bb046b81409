"""The SQL statements of task definitions and their executions (migration 0010); only
definitions.py runs them."""

from __future__ import annotations

from typing import Final

# Every column a Definition is made of, of the row `d`.
DEFINITION: Final = """d.id, d.name, d.description, d.template::text AS template, d.version,
    d.created_at, d.updated_at"""

# Stamped by the clock, not the transaction's start: definitions created together are listed
# by createdAt in the order they were given.
INSERT = f"""
INSERT INTO definitions AS d (id, name, description, template, created_at, updated_at)
SELECT $1, $2, $3, $4::jsonb, now.at, now.at FROM (SELECT clock_timestamp() AS at) AS now
RETURNING {DEFINITION}
"""

SELECT_BY_ID = f"SELECT {DEFINITION} FROM definitions d WHERE d.id = $1"

SELECT_BY_NAME = f"SELECT {DEFINITION} FROM definitions d WHERE lower(d.name) = lower($1)"

LOCK_BY_ID = f"SELECT {DEFINITION} FROM definitions d WHERE d.id = $1 FOR UPDATE"

LOCK_BY_NAME = f"SELECT {DEFINITION} FROM definitions d WHERE lower(d.name) = lower($1) FOR UPDATE"

# A write that changes nothing is no change: the version stays.
REPLACE = f"""
UPDATE definitions AS d
SET name = $2, description = $3, template = $4::jsonb, version = d.version + 1,
    updated_at = clock_timestamp()
WHERE d.id = $1
RETURNING {DEFINITION}
"""

DELETE = "DELETE FROM definitions WHERE id = ANY($1::text[]) RETURNING id"

# The names match if they contain $1 (a LIKE pattern, its wildcards escaped), in any case.
_NAMED = "($1::text IS NULL OR lower(d.name) LIKE lower($1) ESCAPE '\\')"

# Sortable fields of GET /definitions and the keys behind them (the only text spliced into SQL);
# each has an index (0010), ties broken by id.
ORDER_COLUMNS: Final = {
    "name": "lower(d.name)",
    "createdAt": "d.created_at",
    "updatedAt": "d.updated_at",
}


def page(order: str, descending: bool) -> str:
    """Definitions whose name contains $1 (null: all), in this order, $2 skipped, $3 at most."""
    direction = "DESC" if descending else "ASC"
    return f"""
SELECT {DEFINITION} FROM definitions d WHERE {_NAMED}
ORDER BY {ORDER_COLUMNS[order]} {direction}, d.id {direction}
OFFSET $2 LIMIT $3
"""


COUNT = f"SELECT count(*) FROM definitions d WHERE {_NAMED}"

# The definition $1 names: its id if $2, else its name in any case if $3 (both: an id first).
_NAMED_BY = """d.id = coalesce(
    (SELECT id FROM definitions WHERE $2 AND id = $1),
    (SELECT id FROM definitions WHERE $3 AND lower(name) = lower($1)))"""

FIND = f"SELECT {DEFINITION} FROM definitions d WHERE {_NAMED_BY}"

# Its next execution index, taken under its row's lock, which concurrent executions wait for in
# turn; a rolled-back execution gives its index back, so none is skipped and none given twice.
TAKE_INDEX = f"""
UPDATE definitions AS d SET executions = d.executions + 1 WHERE {_NAMED_BY}
RETURNING {DEFINITION}, d.executions
"""

# An execution's task, queued: as queries.INSERT_QUEUED, with what the execution records.
INSERT_TASK = """
INSERT INTO tasks (task_id, plan_id, job_id, hub_name, project_id, name, mode, state, digest,
                   message, queued_at, definition_id, definition_version, execution_index, tags,
                   comments, source)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9::jsonb, now(), $10, $11, $12, $13, $14,
        $15)
ON CONFLICT (task_id) DO NOTHING
RETURNING queued_at
"""

INSERT_EXECUTION = """
INSERT INTO executions (execution_id, definition_id, definition_name, execution_index, version,
                        request_digest, input, tags, comments, source, message)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11)
RETURNING created_at
"""

# Every column an ExecutionRecord is made of, of the execution `e` and its task `t` (if kept).
EXECUTION: Final = """e.execution_id, e.execution_index, e.definition_id, e.definition_name,
    e.version, e.input::text AS input, e.tags, e.comments, e.source, e.created_at,
    t.state, t.result, t.reason, t.queued_at, t.started_at, t.completed_at"""

_WITH_TASK = "executions e LEFT JOIN tasks t ON t.task_id = e.execution_id"

SELECT_EXECUTION = f"""
SELECT {EXECUTION}, e.request_digest, e.message FROM {_WITH_TASK} WHERE e.execution_id = $1
"""

SELECT_EXECUTION_BY_INDEX = f"""
SELECT {EXECUTION} FROM {_WITH_TASK} WHERE e.definition_id = $1 AND e.execution_index = $2
"""


def executions(descending: bool) -> str:
    """The executions of definition $1 in index order, $2 skipped, $3 at most."""
    direction = "DESC" if descending else "ASC"
    return f"""
SELECT {EXECUTION} FROM {_WITH_TASK} WHERE e.definition_id = $1
ORDER BY e.execution_index {direction}
OFFSET $2 LIMIT $3
"""


COUNT_EXECUTIONS = "SELECT count(*) FROM executions WHERE definition_id = $1"

# The latest $2 executions of each definition in $1.
LATEST_EXECUTIONS = f"""
SELECT x.* FROM unnest($1::text[]) AS d(id) CROSS JOIN LATERAL (
    SELECT {EXECUTION} FROM {_WITH_TASK} WHERE e.definition_id = d.id
    ORDER BY e.execution_index DESC LIMIT $2
) AS x
"""
