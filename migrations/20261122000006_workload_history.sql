-- Every state a workload passes through, with when and why: what billing meters from
-- (running → first of stopped/terminated/failed) and what a tenant's timeline shows. Written by
-- a trigger, so no code path that changes a workload's state can forget it.
CREATE TABLE workload_state_history (
    id          bigserial PRIMARY KEY,
    workload_id uuid NOT NULL REFERENCES workloads (id) ON DELETE CASCADE,
    state       text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    node_id     uuid,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX workload_state_history_workload ON workload_state_history (workload_id, at);

CREATE FUNCTION workload_state_recorded() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO workload_state_history (workload_id, state, reason, node_id)
        VALUES (NEW.id, NEW.state, NEW.state_reason, NEW.node_id);
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER workload_state_recorded
    AFTER INSERT OR UPDATE OF state ON workloads
    FOR EACH ROW EXECUTE FUNCTION workload_state_recorded();
