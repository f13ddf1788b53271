-- One row per completed inference call through the gateway (what billing rates per request and
-- per token). `id` is the event's id, minted by the gateway before the call's answer is
-- finished: ingesting an event twice (a redelivery, two ingesters) inserts it once.
CREATE TABLE usage_events (
    id                uuid PRIMARY KEY,
    endpoint_id       uuid NOT NULL REFERENCES endpoints (id) ON DELETE CASCADE,
    org_id            uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    api_key_id        uuid,
    replica_id        uuid,
    status            integer NOT NULL,
    duration_ms       bigint NOT NULL CHECK (duration_ms >= 0),
    request_bytes     bigint NOT NULL CHECK (request_bytes >= 0),
    response_bytes    bigint NOT NULL CHECK (response_bytes >= 0),
    prompt_tokens     bigint CHECK (prompt_tokens >= 0),
    completion_tokens bigint CHECK (completion_tokens >= 0),
    occurred_at       timestamptz NOT NULL,
    ingested_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_org_time ON usage_events (org_id, occurred_at);
CREATE INDEX usage_events_endpoint_time ON usage_events (endpoint_id, occurred_at);
