-- The schema reentry keeps on the database a repair writes to (the
-- target: current for a selective repair, restored for a cutover's
-- carry-forward). The stage creates the schema itself, in its own
-- transaction, and refuses one that another role made, or whose tables
-- another role owns or has put triggers on (see src/reentry/owned.rs).
--
-- Each repaired table gets a staging table of its own,
-- reentry_repair."<first 50 bytes of the table as the playbook names
-- it>_<12 hex digits of its sha256>", made by the stage with the
-- source's columns and these, whose `$` keeps them apart from any
-- application column (a source column named reentry$… is refused):
--   reentry$run_id       the run that staged the row
--   reentry$class        insert | update | delete | conflict
--   reentry$would        what the source side would do (for a conflict)
--   reentry$target_hash  md5 of the target row's text as the diff saw it;
--                        the apply writes only where the row still has it
--   reentry$status       staged | applied | conflict (changed since the
--                        diff) | review | kept (target-wins) | not-applied
--   reentry$note         why a row was not applied
--   reentry$staged_at

-- One row per batch and class, in the batch's transaction: the repair's
-- audit log, with the class.
CREATE TABLE IF NOT EXISTS reentry_repair.repair_audit_log (
    repair_id text NOT NULL,
    table_name text NOT NULL,
    class text NOT NULL,
    row_count bigint NOT NULL,
    executed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One row per run and table staged: its staging table and the source's
-- columns it holds, which are what the apply writes.
CREATE TABLE IF NOT EXISTS reentry_repair.stage (
    run_id text NOT NULL,
    table_name text NOT NULL,
    staging_table text NOT NULL,
    columns text[] NOT NULL,
    staged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, table_name)
);
