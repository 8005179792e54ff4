-- A settings version per account, drawn from the sequence of 0002 (never reused), moved by
-- every change to what the send path checks: its users' credentials and allowlists, its
-- senders, its name or STOP clause. The triggers update the account's row, so they wait
-- for (and then hold) the row lock a send's commit takes on it: a send either commits
-- before a change or sees its new version.
ALTER TABLE accounts ADD COLUMN settings_version BIGINT NOT NULL DEFAULT 0;
UPDATE accounts SET settings_version = nextval('settings_version');

CREATE FUNCTION accounts_new_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.name IS DISTINCT FROM OLD.name
            OR NEW.stop_clause IS DISTINCT FROM OLD.stop_clause THEN
        NEW.settings_version := nextval('settings_version');
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_versioned BEFORE INSERT OR UPDATE OF name, stop_clause ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_new_version();

CREATE FUNCTION account_settings_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE accounts SET settings_version = nextval('settings_version')
            WHERE id = OLD.account_id;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        UPDATE accounts SET settings_version = nextval('settings_version')
            WHERE id = NEW.account_id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER users_versioned AFTER INSERT OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION account_settings_changed();
CREATE TRIGGER users_changed AFTER UPDATE OF login, account_id, password_hash, ip_restrictions
    ON users FOR EACH ROW EXECUTE FUNCTION account_settings_changed();
CREATE TRIGGER senders_versioned AFTER INSERT OR DELETE ON senders
    FOR EACH ROW EXECUTE FUNCTION account_settings_changed();
