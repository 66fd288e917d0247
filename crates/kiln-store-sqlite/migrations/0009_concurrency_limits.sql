-- Global concurrency limits by tag, and the slots task runs were granted. A slot counts as
-- held while its run is at the position it was granted at, or Pending, Running or
-- Cancelling (see kiln_store::limit); rows of runs that moved on are removed lazily.
CREATE TABLE concurrency_limits (
    tag     TEXT PRIMARY KEY NOT NULL,
    slots   INTEGER NOT NULL,
    updated INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE concurrency_slots (
    tag         TEXT NOT NULL,
    run_id      BLOB NOT NULL,
    granted_seq INTEGER NOT NULL,
    granted_at  INTEGER NOT NULL,
    PRIMARY KEY (tag, run_id)
) WITHOUT ROWID;
