-- Task definitions and their executions (SPEC §9), and what a task executed from one records.

-- A stored task template: the fields of a task message but its ids (`template`, as written, in
-- JSON), under a name unique in any case. `version` counts its changes; `executions` is the last
-- execution index given out, taken under the row's lock, so that concurrent executions get
-- distinct indexes and none is given twice (a definition deleted takes its counter with it: a
-- new one of the same name has a new id).
CREATE TABLE definitions (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    template    jsonb NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    executions  bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Names are unique case-insensitively, found and sorted by their lower-case form; the orders of
-- GET /definitions each have an index, ties broken by id.
CREATE UNIQUE INDEX definitions_name ON definitions (lower(name));
CREATE INDEX definitions_created_order ON definitions (created_at, id);
CREATE INDEX definitions_updated_order ON definitions (updated_at, id);

-- One row per execution, keyed by its task's id. No foreign key to definitions: a definition
-- deleted leaves its executions readable. `request_digest` (sha256 of the execution request)
-- tells a repeat of the same execution from another under the same id; `message` is the task
-- message it queued, byte for byte, so that a repeat queues the same one (its sha256 is the
-- task's digest).
CREATE TABLE executions (
    execution_id    text PRIMARY KEY,
    definition_id   text NOT NULL,
    definition_name text NOT NULL,
    execution_index bigint NOT NULL,
    version         integer NOT NULL,
    request_digest  bytea NOT NULL,
    input           jsonb NOT NULL DEFAULT '{}',
    tags            text[] NOT NULL DEFAULT '{}',
    comments        text NOT NULL DEFAULT '',
    source          text NOT NULL DEFAULT '',
    message         text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- A definition's executions in index order (GET /definitions/{id}/executions[/{index}]).
CREATE UNIQUE INDEX executions_definition_order ON executions (definition_id, execution_index);

-- A task executed from a definition records which, at what version and index, with the
-- execution's tags, comments and source. Every other task leaves them null: adding nullable
-- columns rewrites nothing, and the partial indexes hold no entry for those tasks, so that
-- ordinary tasks pay nothing for them.
ALTER TABLE tasks
    ADD COLUMN definition_id      text,
    ADD COLUMN definition_version integer,
    ADD COLUMN execution_index    bigint,
    ADD COLUMN tags               text[],
    ADD COLUMN comments           text,
    ADD COLUMN source             text;
-- GET /tasks?definition= in queue order (the default), as the other filters (0008).
CREATE INDEX tasks_definition_order ON tasks (definition_id, queued_at, task_id)
    WHERE definition_id IS NOT NULL;
-- GET /tasks?tag=: which tasks carry a tag.
CREATE INDEX tasks_tags ON tasks USING gin (tags) WHERE tags IS NOT NULL;
