-- The PostgreSQL dialect of 0002: the store-wide counter of settings versions is a sequence
-- (its values are never handed out twice, even by transactions that roll back). SQLite's
-- store-wide triggers of 0002 were replaced by per-account ones in 0005; here 0005 adds
-- those directly.
CREATE SEQUENCE settings_version;
