-- Dead outbox items are counted for /readyz and /metrics: without an index that count
-- read the whole outbox (two rows per delivered message).
CREATE INDEX outbox_dead ON outbox (kind) WHERE state = 'dead';
