-- Tables reentry creates on the restored database, in its own schema
-- `reentry`, to stage what needs a person: events Kafka has and the
-- database lost, and idempotency keys to review. Every row names the run
-- that staged it. reentry creates the schema itself, and refuses one that
-- another role made, or whose tables another role owns or has put
-- triggers on (see src/reentry/owned.rs).
CREATE TABLE IF NOT EXISTS reentry.orphan_event (
    run_id text NOT NULL,
    outbox text NOT NULL,
    event_id text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    event_time timestamptz,
    key bytea,
    payload bytea,
    headers jsonb,
    staged_at timestamptz NOT NULL DEFAULT now(),
    compensated_at timestamptz,
    PRIMARY KEY (topic, partition, "offset")
);

CREATE TABLE IF NOT EXISTS reentry.idempotency_review (
    run_id text NOT NULL,
    idempotency text NOT NULL,
    key text NOT NULL,
    source text NOT NULL,
    seen_at timestamptz,
    staged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (idempotency, key)
);

CREATE TABLE IF NOT EXISTS reentry.idempotency_tombstone (
    run_id text NOT NULL,
    idempotency text NOT NULL,
    key text NOT NULL,
    source text NOT NULL,
    seen_at timestamptz,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (idempotency, key)
);
