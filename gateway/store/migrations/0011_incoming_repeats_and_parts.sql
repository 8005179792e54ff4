-- Messages from handsets as an SMSC delivers them (see gateway/store/rules.py, "messages
-- from handsets"): one sent again (its deliver_sm answer missed) is found by its reference
-- and kept once; the parts of a long one are kept as they come, each before the SMSC is
-- answered, so that a crash between two parts loses none.
CREATE INDEX incoming_messages_by_reference ON incoming_messages (reference, created_at);

CREATE TABLE incoming_parts (
    sender      TEXT NOT NULL,
    receiver    TEXT NOT NULL,
    group_ref   INTEGER NOT NULL,   -- the concatenation reference its message's parts share
    total       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    reference   TEXT NOT NULL,      -- the operator's, of this part
    body        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    -- NULL while its message waits for parts; then that message's id (0: no account claims
    -- it), so that the part sent again is known for what it is.
    incoming_id INTEGER,
    PRIMARY KEY (sender, receiver, group_ref, total, seq)
);
CREATE INDEX incoming_parts_by_age ON incoming_parts (created_at);
