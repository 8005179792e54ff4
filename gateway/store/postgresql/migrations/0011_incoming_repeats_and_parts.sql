-- The PostgreSQL dialect of gateway/store/migrations/0011_incoming_repeats_and_parts.sql
-- (see it for the why): messages from handsets found by their reference when sent again,
-- and the parts of long ones kept until every part is.
CREATE INDEX incoming_messages_by_reference ON incoming_messages (reference, created_at);

CREATE TABLE incoming_parts (
    sender      TEXT NOT NULL,
    receiver    TEXT NOT NULL,
    group_ref   INTEGER NOT NULL,
    total       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    reference   TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    incoming_id BIGINT,
    PRIMARY KEY (sender, receiver, group_ref, total, seq)
);
CREATE INDEX incoming_parts_by_age ON incoming_parts (created_at);
