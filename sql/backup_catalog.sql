-- The backup catalog, mirrored from the repository by
-- `reentry backup list --sync-catalog CONNINFO`. The repository is the
-- source of truth for its own rows (those whose storage_uri points into
-- it): rows of its backups no longer in it are deleted; other
-- repositories' rows are left alone, even where the backup id is one this
-- repository also has (a copy made by `repo copy`): the first repository
-- to sync a backup keeps its row, and the others name it in a warning.
CREATE TABLE IF NOT EXISTS backup_catalog (
    backup_id text PRIMARY KEY,
    cluster_name text NOT NULL,
    backup_type text NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    base_lsn pg_lsn,
    wal_start_lsn pg_lsn,
    wal_end_lsn pg_lsn,
    storage_uri text NOT NULL,
    manifest_uri text,
    verified_at timestamptz,
    restore_tested_at timestamptz
);
