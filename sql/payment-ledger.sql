-- The payment-ledger sample application (playbooks/payment-ledger.toml):
-- an append-mostly ledger repaired in place after a bad job, with Spring
-- Modulith's event publication log and payment idempotency keys.
CREATE TABLE IF NOT EXISTS account (
    id bigint PRIMARY KEY,
    currency char(3) NOT NULL,
    balance_minor bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS ledger_entry (
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES account (id),
    amount_minor bigint NOT NULL,
    booked_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Spring Modulith's JPA event publication registry.
CREATE TABLE IF NOT EXISTS event_publication (
    id uuid PRIMARY KEY,
    listener_id text NOT NULL,
    event_type text NOT NULL,
    serialized_event text NOT NULL,
    publication_date timestamptz NOT NULL,
    completion_date timestamptz
);

CREATE TABLE IF NOT EXISTS payment_idempotency (
    key text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
