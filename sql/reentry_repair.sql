-- The schema reentry creates on the database a repair writes to (the
-- target: current for a selective repair, restored for a cutover's
-- carry-forward), in the stage's own transaction, IF NOT EXISTS.
--
-- Each repaired table gets a staging table of its own,
-- reentry_repair."<table as the playbook names it>", made by the stage
-- with the source's columns and these:
--   _run_id       the run that staged the row
--   _class        insert | update | delete | conflict
--   _would        what the source side would do (for a conflict)
--   _target_hash  md5 of the target row's text as the diff saw it; the
--                 apply writes only where the row still has it
--   _status       staged | applied | conflict (changed since the diff) |
--                 review | kept (target-wins) | not-applied
--   _note         why a row was not applied
--   _staged_at
CREATE SCHEMA IF NOT EXISTS reentry_repair;

-- One row per batch and class, in the batch's transaction: the repair's
-- audit log, with the class.
CREATE TABLE IF NOT EXISTS reentry_repair.repair_audit_log (
    repair_id text NOT NULL,
    table_name text NOT NULL,
    class text NOT NULL,
    row_count bigint NOT NULL,
    executed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
