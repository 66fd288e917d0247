-- The Kiln server's API tokens: a name, the hash of the secret (never the secret), and
-- whether it may only read.
CREATE TABLE api_tokens (
    name      TEXT PRIMARY KEY,
    hash      TEXT NOT NULL UNIQUE,
    read_only BOOLEAN NOT NULL,
    created   BIGINT NOT NULL,
    revoked   BIGINT
);
