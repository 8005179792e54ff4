-- A settings version per account, in place of one for the whole store: a change to one
-- account's send settings (its users' credentials and allowlists, its senders, its name or
-- STOP clause) makes only that account's cached send contexts stale. With one version,
-- deleting and re-creating users of one account made other accounts' sends check again
-- until they gave up with a 503.
--
-- Versions are drawn from the store-wide counter of 0002 (meta 'settings_version'), so a
-- version is never reused: an account deleted and created again, even under the same id,
-- never matches a context cached for the old one.

ALTER TABLE accounts ADD COLUMN settings_version INTEGER NOT NULL DEFAULT 0;
UPDATE accounts SET settings_version =
    (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version');

DROP TRIGGER users_added;
DROP TRIGGER users_removed;
DROP TRIGGER users_changed;
DROP TRIGGER senders_added;
DROP TRIGGER senders_removed;
DROP TRIGGER accounts_changed;
-- An account removed takes its version with it: an order for it is refused as stale.
DROP TRIGGER accounts_removed;

CREATE TRIGGER accounts_added AFTER INSERT ON accounts BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'settings_version';
    UPDATE accounts SET settings_version =
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version')
        WHERE id = NEW.id;
END;
CREATE TRIGGER users_added AFTER INSERT ON users BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'settings_version';
    UPDATE accounts SET settings_version =
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version')
        WHERE id = NEW.account_id;
END;
CREATE TRIGGER users_removed AFTER DELETE ON users BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'settings_version';
    UPDATE accounts SET settings_version =
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version')
        WHERE id = OLD.account_id;
END;
CREATE TRIGGER users_changed AFTER UPDATE OF login, account_id, password_hash, ip_restrictions
    ON users BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'settings_version';
    UPDATE accounts SET settings_version =
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version')
        WHERE id IN (OLD.account_id, NEW.account_id);
END;
CREATE TRIGGER senders_added AFTER INSERT ON senders BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'settings_version';
    UPDATE accounts SET settings_version =
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version')
        WHERE id = NEW.account_id;
END;
CREATE TRIGGER senders_removed AFTER DELETE ON senders BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'settings_version';
    UPDATE accounts SET settings_version =
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version')
        WHERE id = OLD.account_id;
END;
CREATE TRIGGER accounts_changed AFTER UPDATE OF name, stop_clause ON accounts BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'settings_version';
    UPDATE accounts SET settings_version =
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version')
        WHERE id = NEW.id;
END;
