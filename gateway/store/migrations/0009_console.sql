-- The web console's users and sessions (gateway/console/). A console user is not an API
-- user: its password (at least 12 characters, scrypt as API users') opens the console only.
-- A session is found by the SHA-256 of its cookie's random token, never the token itself.

CREATE TABLE console_users (
    id            INTEGER PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,   -- lowercased
    password_hash TEXT NOT NULL,
    operator      INTEGER NOT NULL,       -- 1: every account, creating accounts, top-ups
    created_at    REAL NOT NULL
);

-- The accounts a console user that is not an operator may manage.
CREATE TABLE console_user_accounts (
    user_id    INTEGER NOT NULL REFERENCES console_users(id) ON DELETE CASCADE,
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, account_id)
) WITHOUT ROWID;

CREATE TABLE console_sessions (
    digest       TEXT PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES console_users(id) ON DELETE CASCADE,
    csrf         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    last_seen_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX console_sessions_by_user ON console_sessions (user_id);
