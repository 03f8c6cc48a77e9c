-- The case-management sample application (playbooks/case-management.toml):
-- cases and their events, payments, a transactional outbox, a consumer
-- inbox and its projection, idempotency keys, and the job log the gate
-- probe reads. The lab (lab/) is this application.
CREATE TABLE IF NOT EXISTS cases (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    status text NOT NULL DEFAULT 'open',
    owner_id bigint,
    priority int NOT NULL DEFAULT 0,
    -- who wrote last: api, a job's name
    updated_by text NOT NULL DEFAULT 'api',
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS payments (
    id bigserial PRIMARY KEY,
    idem_key text NOT NULL UNIQUE,
    case_id bigint NOT NULL,
    amount bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The projector's effect, one per event it processed (lab/app.rs).
CREATE TABLE IF NOT EXISTS case_projection (
    case_id bigint PRIMARY KEY,
    events_applied int NOT NULL
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
