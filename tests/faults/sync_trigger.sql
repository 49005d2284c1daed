-- The sync trigger recommended next to a copy job: every application write to the source is
-- mirrored into the target by key, so that rows the copy has passed stay equal while the
-- application keeps writing. Install it BEFORE the copy job starts.
--
-- * insert and update write the row with ON CONFLICT DO UPDATE: it never fails an application
--   write, whether the copy has reached the row yet or not;
-- * delete removes the row from the target (a copy that reaches it later finds it gone in the
--   source too);
-- * the copy locks the rows it copies FOR SHARE, so an update racing a batch waits for it and
--   then overwrites what it copied: the application's change wins.
--
-- Names to replace: src (the source), dst (the target), the key (here id) and the columns.
-- tests/faults/test_shapes_kill.py installs this file as it is, on the tests' tables.

CREATE OR REPLACE FUNCTION src_sync_to_dst() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM dst WHERE id = OLD.id;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id THEN
        DELETE FROM dst WHERE id = OLD.id;
    END IF;
    INSERT INTO dst (id, payload, n, old) VALUES (NEW.id, NEW.payload, NEW.n, NEW.old)
    ON CONFLICT (id) DO UPDATE
        SET payload = EXCLUDED.payload, n = EXCLUDED.n, old = EXCLUDED.old;
    RETURN NEW;
END
$$;

CREATE TRIGGER src_sync_to_dst
AFTER INSERT OR UPDATE OR DELETE ON src
FOR EACH ROW EXECUTE FUNCTION src_sync_to_dst();
