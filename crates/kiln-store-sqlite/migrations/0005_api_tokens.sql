-- The Kiln server's API tokens: a name, the hash of the secret (never the secret), and
-- whether it may only read.
CREATE TABLE api_tokens (
    name      TEXT PRIMARY KEY NOT NULL,
    hash      TEXT NOT NULL UNIQUE,
    read_only INTEGER NOT NULL,
    created   INTEGER NOT NULL,
    revoked   INTEGER
) WITHOUT ROWID;
