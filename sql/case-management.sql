-- The case-management sample application (playbooks/case-management.toml):
-- cases and their events, a transactional outbox, a consumer inbox,
-- idempotency keys, and the job log the gate probe reads.
CREATE TABLE IF NOT EXISTS cases (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    status text NOT NULL DEFAULT 'open',
    owner_id bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS outbox_event (
    id uuid PRIMARY KEY,
    topic text NOT NULL,
    aggregate_id text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE TABLE IF NOT EXISTS inbox_message (
    message_id text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS idempotency_key (
    idem_key text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    response jsonb
);

CREATE TABLE IF NOT EXISTS job_run (
    id bigserial PRIMARY KEY,
    job_name text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
