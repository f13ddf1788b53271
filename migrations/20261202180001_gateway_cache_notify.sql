-- Tell every gateway when something it caches changes, so an answer it holds (an API key, an
-- org's standing, an endpoint's route) is dropped at once instead of at its TTL. One channel,
-- `kiln_gateway_cache`, with payloads `key:<sha-256 of the secret, hex>`, `org:<uuid>` and
-- `endpoint:<uuid>`. A revoked key stops working as soon as its gateway hears this.

CREATE FUNCTION gateway_cache_notify_key() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('kiln_gateway_cache', 'key:' || encode(OLD.secret_hash, 'hex'));
    ELSE
        PERFORM pg_notify('kiln_gateway_cache', 'key:' || encode(NEW.secret_hash, 'hex'));
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Not on `last_used_at`: the hot path's own bookkeeping must not evict what it just cached.
CREATE TRIGGER api_keys_gateway_cache
    AFTER INSERT OR DELETE OR UPDATE OF revoked_at, expires_at, role, org_id, secret_hash
    ON api_keys FOR EACH ROW EXECUTE FUNCTION gateway_cache_notify_key();

CREATE FUNCTION gateway_cache_notify_endpoint() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('kiln_gateway_cache', 'endpoint:' || OLD.id::text);
    ELSE
        PERFORM pg_notify('kiln_gateway_cache', 'endpoint:' || NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER endpoints_gateway_cache
    AFTER INSERT OR UPDATE OR DELETE ON endpoints
    FOR EACH ROW EXECUTE FUNCTION gateway_cache_notify_endpoint();

-- A replica that becomes ready, stops or moves changes its endpoint's route. The ports it
-- publishes arrive with the state change (one transaction in `node_observe`).
CREATE FUNCTION gateway_cache_notify_replica() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_gateway_cache', 'endpoint:' || NEW.endpoint_id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER workloads_gateway_cache_insert
    AFTER INSERT ON workloads
    FOR EACH ROW WHEN (NEW.endpoint_id IS NOT NULL)
    EXECUTE FUNCTION gateway_cache_notify_replica();
CREATE TRIGGER workloads_gateway_cache_update
    AFTER UPDATE OF state, node_id ON workloads
    FOR EACH ROW WHEN (NEW.endpoint_id IS NOT NULL AND
                       (OLD.state IS DISTINCT FROM NEW.state OR OLD.node_id IS DISTINCT FROM NEW.node_id))
    EXECUTE FUNCTION gateway_cache_notify_replica();

-- An org's standing: its credit terms and the billing enforcer's mark change here...
CREATE FUNCTION gateway_cache_notify_org_settings() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kiln_gateway_cache', 'org:' || NEW.org_id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_settings_gateway_cache
    AFTER INSERT OR UPDATE ON billing_settings
    FOR EACH ROW EXECUTE FUNCTION gateway_cache_notify_org_settings();

-- ...and credits (top-ups, promotional grants) lift a refusal at once. Charges are many and
-- only ever lower the funds: gateways learn of those within their short standing TTL, and the
-- enforcer's mark above. Once per statement, one notice per org (NOTIFY also folds repeats).
CREATE FUNCTION gateway_cache_notify_credits() RETURNS trigger AS $$
DECLARE
    o uuid;
BEGIN
    FOR o IN SELECT DISTINCT org_id FROM new_postings
             WHERE org_id IS NOT NULL AND kind IN ('top_up', 'promo_grant')
    LOOP
        PERFORM pg_notify('kiln_gateway_cache', 'org:' || o::text);
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER ledger_postings_gateway_cache
    AFTER INSERT ON ledger_postings REFERENCING NEW TABLE AS new_postings
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_cache_notify_credits();
