-- Tell every API replica when a workload's state, reason or node changes (payload: its UUID),
-- so live views (server-sent events) update at once instead of polling.
CREATE FUNCTION workload_changed_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_workload_changed', NEW.id::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER workload_changed_notify
    AFTER UPDATE OF state, state_reason, node_id ON workloads
    FOR EACH ROW EXECUTE FUNCTION workload_changed_notify();
