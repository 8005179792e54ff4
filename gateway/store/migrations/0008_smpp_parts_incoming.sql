-- A real network (SMPP) reports each part of a long message: a message is delivered when
-- every part is. Each part remembers whether it was reported delivered.
-- (the message counts them: nothing looks its parts up by message).
ALTER TABLE message_parts ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN parts_delivered INTEGER NOT NULL DEFAULT 0;

-- Messages sent by handsets to the gateway's numbers (replies, STOP), kept for the account
-- whose reply number or sender they answer.
CREATE TABLE incoming_messages (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts(id),
    reference   TEXT NOT NULL,
    sender      TEXT NOT NULL,
    receiver    TEXT NOT NULL,
    body        TEXT NOT NULL,
    tag         TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);
CREATE INDEX incoming_messages_by_account ON incoming_messages (account_id, id);
