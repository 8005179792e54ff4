-- Retention (issue 23): how long an account's data is kept, and the purge's progress.

-- An account's own days (NULL: the [retention] settings'); see gateway/retention.py.
ALTER TABLE accounts ADD COLUMN retention_days INTEGER;
ALTER TABLE accounts ADD COLUMN personal_data_days INTEGER;

-- Up to which id the purge has erased the personal data of an account's messages ('messages')
-- or incoming messages ('incoming'): erased rows stay, and no index on their age is worth
-- a write more per send, so the purge walks each account's rows by id from here (ids grow
-- with time) and stops at the first one not yet due.
CREATE TABLE purge_progress (
    account_id     INTEGER NOT NULL,
    what           TEXT NOT NULL,
    erased_through INTEGER NOT NULL,
    PRIMARY KEY (account_id, what)
) WITHOUT ROWID;

-- Messages passed over by the erasure while not yet final (deferred for months): their
-- text is still to be sent. Erased once final.
CREATE TABLE purge_held (
    message_id INTEGER PRIMARY KEY
);

-- A deleted message takes its parts with it: found by message, not by reference.
CREATE INDEX message_parts_by_message ON message_parts (message_id);
