-- Delivery by claims, and the operator's references of each message part (see the SQLite
-- migration 0004 for the why). Claims take rows FOR UPDATE SKIP LOCKED.
ALTER TABLE messages ADD COLUMN claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0;

CREATE INDEX messages_due_queued ON messages (claimed_until, id) WHERE state = 'queued';
CREATE INDEX messages_due_deferred ON messages (GREATEST(deferred_until, claimed_until), id)
    WHERE state = 'deferred';

CREATE TABLE message_parts (
    reference  TEXT PRIMARY KEY,
    message_id BIGINT NOT NULL,
    part       INTEGER NOT NULL
);
