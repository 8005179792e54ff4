-- Tokens of the admin API, created with `http2sms token create`. The secret is never stored:
-- `digest` is SHA-256 of it (see gateway/tokens.py for why a fast hash is right here), and
-- `key`, the non-secret part of the token, finds the row.

CREATE TABLE admin_tokens (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    key          TEXT NOT NULL UNIQUE,
    digest       TEXT NOT NULL,
    all_accounts INTEGER NOT NULL,   -- 1: every account, present and future
    created_at   REAL NOT NULL,
    last_used_at REAL
);

-- The accounts of a token that is not for all of them; an account deleted leaves its tokens.
CREATE TABLE admin_token_accounts (
    token_id   INTEGER NOT NULL REFERENCES admin_tokens(id) ON DELETE CASCADE,
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    PRIMARY KEY (token_id, account_id)
) WITHOUT ROWID;
