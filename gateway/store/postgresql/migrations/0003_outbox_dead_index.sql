CREATE INDEX outbox_dead ON outbox (kind) WHERE state = 'dead';
