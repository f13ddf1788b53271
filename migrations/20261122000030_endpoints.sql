-- Endpoints (AaaS): a model server deployed as replicas — workloads of kind `endpoint_replica`,
-- placed by the scheduler and run by agents exactly like pods — behind the gateway's URL.
CREATE TABLE endpoints (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name             text NOT NULL,
    state            text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'deleted')),
    -- What each replica runs: the pod-shaped spec (image, command, env, ports = [port]) and the
    -- GPU ask, as the API validated them.
    spec             jsonb NOT NULL,
    port             integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    health_path      text NOT NULL DEFAULT '/',
    min_replicas     integer NOT NULL CHECK (min_replicas BETWEEN 0 AND 64),
    max_replicas     integer NOT NULL CHECK (max_replicas BETWEEN 1 AND 64),
    -- How many replicas the endpoint should have now (the autoscaler moves it within
    -- [min, max]; the endpoint controller keeps that many live replicas).
    desired_replicas integer NOT NULL CHECK (desired_replicas >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,
    CHECK (max_replicas >= min_replicas),
    CHECK (desired_replicas BETWEEN min_replicas AND max_replicas OR state = 'deleted')
);
CREATE UNIQUE INDEX endpoints_org_name ON endpoints (org_id, name) WHERE state = 'active';
CREATE INDEX endpoints_org ON endpoints (org_id, created_at);

ALTER TABLE workloads ADD COLUMN endpoint_id uuid REFERENCES endpoints (id) ON DELETE CASCADE;
ALTER TABLE workloads ADD CHECK ((kind = 'endpoint_replica') = (endpoint_id IS NOT NULL));
CREATE INDEX workloads_endpoint ON workloads (endpoint_id) WHERE endpoint_id IS NOT NULL;
