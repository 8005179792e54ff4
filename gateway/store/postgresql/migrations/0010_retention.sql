-- The PostgreSQL dialect of gateway/store/migrations/0010_retention.sql (see it for the
-- why): an account's own retention days, the purge's progress and held messages, and the
-- parts of a message found by message.
ALTER TABLE accounts ADD COLUMN retention_days INTEGER;
ALTER TABLE accounts ADD COLUMN personal_data_days INTEGER;

CREATE TABLE purge_progress (
    account_id     BIGINT NOT NULL,
    what           TEXT NOT NULL,
    erased_through BIGINT NOT NULL,
    PRIMARY KEY (account_id, what)
);

CREATE TABLE purge_held (
    message_id BIGINT PRIMARY KEY
);

CREATE INDEX message_parts_by_message ON message_parts (message_id);
