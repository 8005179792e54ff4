-- Credits are integer hundredths; times are Unix seconds (REAL, UTC).

CREATE TABLE accounts (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    balance      INTEGER NOT NULL CHECK (balance >= 0),
    callback_url TEXT,
    stop_clause  TEXT,              -- NULL: the server's send.stop_clause
    created_at   REAL NOT NULL
);

CREATE TABLE senders (
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    sender     TEXT NOT NULL,
    PRIMARY KEY (account_id, sender)
) WITHOUT ROWID;

CREATE TABLE users (
    id              INTEGER PRIMARY KEY,
    account_id      INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    login           TEXT NOT NULL,
    password_hash   TEXT NOT NULL,
    quota_active    INTEGER NOT NULL DEFAULT 0,
    quota_left      INTEGER NOT NULL DEFAULT 0 CHECK (quota_left >= 0),
    alert_threshold INTEGER,        -- NULL: no low-credit alert
    alert_support   TEXT NOT NULL DEFAULT 'mail',
    alert_email     TEXT,
    alert_number    TEXT,
    alert_armed     INTEGER NOT NULL DEFAULT 1,
    ip_restrictions TEXT NOT NULL DEFAULT '[]',   -- JSON array of addresses
    callback_url    TEXT,
    created_at      REAL NOT NULL,
    UNIQUE (account_id, login)
);

CREATE TABLE messages (
    id             INTEGER PRIMARY KEY,
    account_id     INTEGER NOT NULL REFERENCES accounts(id),
    user_id        INTEGER,           -- NULL once the user is deleted
    login          TEXT NOT NULL,     -- kept for the history when the user is gone
    kind           TEXT NOT NULL DEFAULT 'api',   -- 'api' or 'alert'
    sender         TEXT NOT NULL,
    receiver       TEXT NOT NULL,
    body           TEXT NOT NULL,
    coding         INTEGER NOT NULL,
    parts          INTEGER NOT NULL,
    class          INTEGER NOT NULL,
    no_stop        INTEGER NOT NULL,
    tag            TEXT NOT NULL DEFAULT '',
    credits        INTEGER NOT NULL,
    charged_to     TEXT NOT NULL,     -- 'quota' or 'account': where a refund goes back
    created_at     REAL NOT NULL,
    deferred_until REAL,
    -- queued: waits for the operator; deferred: waits for deferred_until;
    -- sent: handed to the operator; final: reached a final ptt.
    state          TEXT NOT NULL,
    ptt            INTEGER,
    dlr            INTEGER NOT NULL DEFAULT 0,
    sent_at        REAL,
    delivered_at   REAL,
    updated_at     REAL NOT NULL
);
CREATE INDEX messages_pending ON messages (state, deferred_until) WHERE state <> 'final';
CREATE INDEX messages_by_account ON messages (account_id, id);
CREATE INDEX messages_by_user ON messages (user_id, id);

CREATE TABLE message_events (
    id         INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL,
    at         REAL NOT NULL,
    ptt        INTEGER,
    dlr        INTEGER NOT NULL,
    note       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX message_events_by_message ON message_events (message_id, id);

-- Work that must survive a restart: delivery-report callbacks and low-credit alerts.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    kind            TEXT NOT NULL,    -- 'callback', 'alert_mail', 'alert_sms'
    message_id      INTEGER,
    account_id      INTEGER NOT NULL,
    user_id         INTEGER,
    target          TEXT NOT NULL,    -- URL, e-mail address or phone number
    payload         TEXT NOT NULL,    -- JSON
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,    -- also the lease of a claimed item
    attempts        INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL DEFAULT 'pending',   -- pending, done, dead
    last_error      TEXT NOT NULL DEFAULT '',
    done_at         REAL
);
CREATE INDEX outbox_due ON outbox (kind, next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_by_message ON outbox (message_id) WHERE message_id IS NOT NULL;

CREATE TABLE outbox_attempts (
    id        INTEGER PRIMARY KEY,
    outbox_id INTEGER NOT NULL,
    at        REAL NOT NULL,
    ok        INTEGER NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX outbox_attempts_by_item ON outbox_attempts (outbox_id, id);

-- Every credit movement, from one pool to another: 'outside' (purchases), 'account',
-- 'quota' (an API user's), 'spent'. purchased = balance + quotas + spent, always.
CREATE TABLE ledger (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    account_id INTEGER NOT NULL,
    user_id    INTEGER,
    login      TEXT,
    kind       TEXT NOT NULL,        -- purchase, quota, send, refund, alert
    source     TEXT NOT NULL,
    target     TEXT NOT NULL,
    amount     INTEGER NOT NULL CHECK (amount >= 0),
    reference  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX ledger_by_account ON ledger (account_id, id);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
