-- An endpoint's owner can let other orgs call it, and charge them for it.
--
-- * `endpoints.price_*`: what a call by a granted org costs that org, per request and per 1,000
--   prompt and completion tokens, in micro-USD — paid from the caller's paid balance to the
--   owner's. All three set, or none (no price: the owner's grantees call for free). The owner's
--   own calls, and the compute behind every call, are priced by the operator's catalog as before.
-- * `endpoint_grants`: the orgs whose API keys may call an endpoint besides its owner's.
-- * `usage_events.caller_org_id` and `resale_*`: who made the call, and the endpoint's price as
--   the gateway saw it when it answered (a later price change does not re-price past calls).
ALTER TABLE endpoints
    ADD COLUMN price_per_request_micros          bigint
        CHECK (price_per_request_micros BETWEEN 0 AND 1000000000000),
    ADD COLUMN price_per_1k_prompt_tokens_micros bigint
        CHECK (price_per_1k_prompt_tokens_micros BETWEEN 0 AND 1000000000000),
    ADD COLUMN price_per_1k_completion_tokens_micros bigint
        CHECK (price_per_1k_completion_tokens_micros BETWEEN 0 AND 1000000000000),
    ADD CHECK ((price_per_request_micros IS NULL) = (price_per_1k_prompt_tokens_micros IS NULL)
           AND (price_per_request_micros IS NULL) = (price_per_1k_completion_tokens_micros IS NULL));

CREATE TABLE endpoint_grants (
    endpoint_id uuid NOT NULL REFERENCES endpoints (id) ON DELETE CASCADE,
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, org_id)
);
CREATE INDEX endpoint_grants_org ON endpoint_grants (org_id);

-- A grant given or taken back changes who the gateways let call the endpoint: drop its route.
CREATE FUNCTION gateway_cache_notify_grant() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('kiln_gateway_cache', 'endpoint:' || OLD.endpoint_id::text);
    ELSE
        PERFORM pg_notify('kiln_gateway_cache', 'endpoint:' || NEW.endpoint_id::text);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER endpoint_grants_gateway_cache
    AFTER INSERT OR DELETE ON endpoint_grants
    FOR EACH ROW EXECUTE FUNCTION gateway_cache_notify_grant();

ALTER TABLE usage_events
    ADD COLUMN caller_org_id uuid REFERENCES orgs (id) ON DELETE SET NULL,
    ADD COLUMN resale_per_request_micros bigint CHECK (resale_per_request_micros >= 0),
    ADD COLUMN resale_per_1k_prompt_tokens_micros bigint
        CHECK (resale_per_1k_prompt_tokens_micros >= 0),
    ADD COLUMN resale_per_1k_completion_tokens_micros bigint
        CHECK (resale_per_1k_completion_tokens_micros >= 0);
