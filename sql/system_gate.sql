-- The kill switches Java services check before they act (one row a gate),
-- plus ShedLock's table; reentry closes and re-opens both.
CREATE TABLE IF NOT EXISTS system_gate (
    gate_name text PRIMARY KEY,
    enabled boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shedlock (
    name varchar(64) PRIMARY KEY,
    lock_until timestamptz NOT NULL,
    locked_at timestamptz NOT NULL,
    locked_by varchar(255) NOT NULL
);
