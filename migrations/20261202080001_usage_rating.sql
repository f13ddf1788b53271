-- Endpoint calls rated into the ledger. A call is rated once: the rating pass claims unrated
-- events (`FOR UPDATE SKIP LOCKED`), posts the charges of the aggregates it groups them into and
-- marks each event with the key of the aggregate that charged it — all in one transaction — so
-- every charged call can be traced to its posting, and two raters never charge a call twice.
ALTER TABLE usage_events
    ADD COLUMN rated_at   timestamptz,
    -- `usage:<endpoint>:<first id>..<last id>:<n>`: the aggregate's key, the root of its
    -- postings' idempotency keys. NULL with `rated_at` set: rated free (not billable, e.g. 5xx).
    ADD COLUMN charge_key text,
    ADD CHECK (charge_key IS NULL OR rated_at IS NOT NULL);
CREATE INDEX usage_events_unrated ON usage_events (occurred_at, id) WHERE rated_at IS NULL;
CREATE INDEX usage_events_charge_key ON usage_events (charge_key) WHERE charge_key IS NOT NULL;
