-- Global concurrency limits by tag, and the slots task runs were granted (the same model
-- as the SQLite schema). A grant locks the limit rows it counts (FOR UPDATE), so two
-- processes never both take a tag's last slot.
CREATE TABLE concurrency_limits (
    tag     TEXT PRIMARY KEY,
    slots   INTEGER NOT NULL,
    updated BIGINT NOT NULL
);

CREATE TABLE concurrency_slots (
    tag         TEXT NOT NULL,
    run_id      UUID NOT NULL,
    granted_seq INTEGER NOT NULL,
    granted_at  BIGINT NOT NULL,
    PRIMARY KEY (tag, run_id)
);
