-- A counter bumped by every change to what the send path checks a request against
-- (credentials, allowlists, senders, STOP clause), whichever process makes it. The send path
-- caches those settings and commits a send only if the counter has not moved since.
-- Credit movements do not touch these columns, so they never bump it.

INSERT OR IGNORE INTO meta (key, value) VALUES ('settings_version', '0');

CREATE TRIGGER users_added AFTER INSERT ON users BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'settings_version';
END;
CREATE TRIGGER users_removed AFTER DELETE ON users BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'settings_version';
END;
CREATE TRIGGER users_changed AFTER UPDATE OF login, account_id, password_hash, ip_restrictions
    ON users BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'settings_version';
END;
CREATE TRIGGER senders_added AFTER INSERT ON senders BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'settings_version';
END;
CREATE TRIGGER senders_removed AFTER DELETE ON senders BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'settings_version';
END;
CREATE TRIGGER accounts_changed AFTER UPDATE OF name, stop_clause ON accounts BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'settings_version';
END;
CREATE TRIGGER accounts_removed AFTER DELETE ON accounts BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'settings_version';
END;
