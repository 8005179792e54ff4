-- Delivery by claims, and the operator's references of each message part.

-- Until when a message is claimed by a dispatcher (a lease: a crashed dispatcher's claims
-- run out) or held back by an operator's "try later". 0: free. Only 'queued' and
-- 'deferred' messages are claimed; marking one sent ends its claim.
ALTER TABLE messages ADD COLUMN claimed_until REAL NOT NULL DEFAULT 0;

-- Messages that may be handed to the operator, by when they are due: a queued message as
-- soon as its claim ends, a deferred one at its time or at the end of its claim if later.
-- A claim reads the front of each, and the time to wake up for is their first entries.
CREATE INDEX messages_due_queued ON messages (claimed_until, id) WHERE state = 'queued';
CREATE INDEX messages_due_deferred ON messages (max(deferred_until, claimed_until), id)
    WHERE state = 'deferred';

-- One row per part the operator took, named by the operator's reference: its delivery
-- reports find their message here. A reference the network reuses names its newest part.
CREATE TABLE message_parts (
    reference  TEXT PRIMARY KEY,
    message_id INTEGER NOT NULL,
    part       INTEGER NOT NULL
) WITHOUT ROWID;
-- Nothing looks parts up by message yet: no index for that, one write less per message.

-- Messages in flight across this upgrade were taken by the simulated operator (the only
-- one until now), which names a message's single part '<id>.1': their reports, after the
-- restart, must still find them.
INSERT OR IGNORE INTO message_parts (reference, message_id, part)
    SELECT id || '.1', id, 1 FROM messages WHERE state = 'sent';
