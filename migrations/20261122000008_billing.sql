-- Billing: the versioned price catalog, a double-entry append-only ledger, per-org billing
-- settings, rating cursors, suspensions for orgs out of credit, metered endpoint usage and
-- monthly invoices. The pure rules (rating, rounding, promo spending, invoices) are in
-- kiln-billing-core; this schema keeps what they produce honest:
--
-- * every posting's entries sum to zero and it has at least two (a deferred constraint
--   trigger, checked at commit, so a posting and its entries are written in one transaction);
-- * postings and entries are append-only (UPDATE and DELETE raise);
-- * every posting has a unique idempotency key derived from what it records, so re-running
--   rating, a duplicate top-up or a replayed webhook cannot post twice;
-- * a price version in effect is history: it cannot be changed or deleted.
--
-- Money is bigint micro-units (1e-6) of `currency` (USD only so far).

-- The price catalog. A version is in effect from `effective_from` until the next one's.
CREATE TABLE price_versions (
    id                       uuid PRIMARY KEY,
    effective_from           timestamptz NOT NULL UNIQUE,
    -- Disks of stopped instances, per GiB-month (30 days); NULL = storage is not sold.
    storage_gib_month_micros bigint CHECK (storage_gib_month_micros >= 0),
    note                     text NOT NULL DEFAULT '',
    created_by               uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at               timestamptz NOT NULL DEFAULT now()
);

-- A version's prices for one GPU type, one column per product. NULL = not sold on that type
-- (rating such work is an error, never silently free).
CREATE TABLE gpu_prices (
    version_id                          uuid NOT NULL REFERENCES price_versions (id) ON DELETE CASCADE,
    gpu_type                            text NOT NULL,
    instance_gpu_hour_micros            bigint CHECK (instance_gpu_hour_micros >= 0),
    pod_gpu_hour_micros                 bigint CHECK (pod_gpu_hour_micros >= 0),
    -- Per MIG profile, per slice-hour: {"1g.10gb": 450000, …}.
    mig_hour_micros                     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(mig_hour_micros) = 'object'),
    -- Time-sliced shares, per GiB-hour of the declared memory cap.
    share_gib_hour_micros               bigint CHECK (share_gib_hour_micros >= 0),
    spot_discount_bps                   integer NOT NULL DEFAULT 0 CHECK (spot_discount_bps BETWEEN 0 AND 10000),
    endpoint_per_request_micros         bigint CHECK (endpoint_per_request_micros >= 0),
    endpoint_per_1k_prompt_micros       bigint CHECK (endpoint_per_1k_prompt_micros >= 0),
    endpoint_per_1k_completion_micros   bigint CHECK (endpoint_per_1k_completion_micros >= 0),
    CHECK ((endpoint_per_request_micros IS NULL) = (endpoint_per_1k_prompt_micros IS NULL)
       AND (endpoint_per_request_micros IS NULL) = (endpoint_per_1k_completion_micros IS NULL)),
    PRIMARY KEY (version_id, gpu_type)
);

CREATE FUNCTION price_version_in_effect_is_history() RETURNS trigger AS $$
DECLARE
    took_effect timestamptz;
BEGIN
    IF TG_TABLE_NAME = 'price_versions' THEN
        took_effect := OLD.effective_from;
    ELSE
        SELECT effective_from INTO took_effect FROM price_versions WHERE id = OLD.version_id;
    END IF;
    IF took_effect IS NOT NULL AND took_effect <= now() THEN
        RAISE EXCEPTION 'price version effective from % is in effect or past: it cannot change', took_effect
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER price_versions_history BEFORE UPDATE OR DELETE ON price_versions
    FOR EACH ROW EXECUTE FUNCTION price_version_in_effect_is_history();
CREATE TRIGGER gpu_prices_history BEFORE UPDATE OR DELETE ON gpu_prices
    FOR EACH ROW EXECUTE FUNCTION price_version_in_effect_is_history();

-- Default prices for the GPU types Kiln knows (the MIG tables and the simulated inventories).
INSERT INTO price_versions (id, effective_from, storage_gib_month_micros, note)
VALUES ('00000000-0000-7000-8000-000000000001', '2026-01-01T00:00:00Z', 100000,
        'default catalog');
INSERT INTO gpu_prices (version_id, gpu_type, instance_gpu_hour_micros, pod_gpu_hour_micros,
                        mig_hour_micros, share_gib_hour_micros, spot_discount_bps,
                        endpoint_per_request_micros, endpoint_per_1k_prompt_micros,
                        endpoint_per_1k_completion_micros)
VALUES
    ('00000000-0000-7000-8000-000000000001', 'h100-80gb', 3290000, 2990000,
     '{"1g.10gb": 450000, "1g.20gb": 600000, "2g.20gb": 900000, "3g.40gb": 1400000, "4g.40gb": 1800000, "7g.80gb": 2990000}',
     40000, 3000, 100, 200, 600),
    ('00000000-0000-7000-8000-000000000001', 'a100-80gb', 1890000, 1690000,
     '{"1g.10gb": 300000, "1g.20gb": 400000, "2g.20gb": 550000, "3g.40gb": 850000, "4g.40gb": 1100000, "7g.80gb": 1690000}',
     25000, 3500, 80, 150, 450),
    ('00000000-0000-7000-8000-000000000001', 'a100-40gb', 1390000, 1190000,
     '{"1g.5gb": 200000, "1g.10gb": 280000, "2g.10gb": 380000, "3g.20gb": 600000, "4g.20gb": 780000, "7g.40gb": 1190000}',
     30000, 3500, 60, 120, 360),
    ('00000000-0000-7000-8000-000000000001', 'l40s-48gb', 1090000, 890000,
     '{}', 20000, 4000, 50, 100, 300);

-- Ledger accounts. Names as kiln-billing-core spells them: `org:<uuid>:balance`,
-- `org:<uuid>:promo:<grant>`, `revenue:gpu`, `revenue:storage`, `revenue:inference`,
-- `external:payments`, `expense:promotions`. Balances are never stored: they are sums of entries.
CREATE TABLE ledger_accounts (
    name       text PRIMARY KEY,
    org_id     uuid,
    kind       text NOT NULL CHECK (kind IN ('balance', 'promo', 'revenue', 'external', 'expense')),
    -- Promotional credit is spendable until then; what is left is expired out.
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind IN ('balance', 'promo')) = (org_id IS NOT NULL)),
    CHECK ((kind = 'promo') = (expires_at IS NOT NULL))
);
CREATE INDEX ledger_accounts_promo ON ledger_accounts (org_id, expires_at) WHERE kind = 'promo';

INSERT INTO ledger_accounts (name, kind) VALUES
    ('revenue:gpu', 'revenue'), ('revenue:storage', 'revenue'), ('revenue:inference', 'revenue'),
    ('external:payments', 'external'), ('expense:promotions', 'expense');

-- One posting: a balanced set of entries under an idempotency key. No foreign key to orgs on
-- purpose: the ledger outlives what it records.
CREATE TABLE ledger_postings (
    id              uuid PRIMARY KEY,  -- UUIDv7: ordered by creation
    idempotency_key text NOT NULL UNIQUE,
    org_id          uuid,
    kind            text NOT NULL CHECK (kind IN ('charge', 'usage', 'top_up', 'promo_grant', 'promo_expiry')),
    -- When it accrued (a charge's period start, a top-up's receipt): invoices go by this.
    at              timestamptz NOT NULL,
    -- The charge, or the credit, as a positive amount.
    amount_micros   bigint NOT NULL CHECK (amount_micros > 0),
    currency        text NOT NULL DEFAULT 'USD' CHECK (currency = 'USD'),
    description     text NOT NULL DEFAULT '',
    -- What a charge is for (NULL for credits).
    workload_id     uuid,
    workload_kind   text,
    product         text,
    gpu_type        text,
    detail          text,
    tier            text,
    period_end      timestamptz,
    price_version   timestamptz,
    unit            text,
    quantity        bigint,
    -- A top-up's reference (operator's, or the payment provider's event id).
    reference       text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind IN ('charge', 'usage')) = (product IS NOT NULL))
);
CREATE INDEX ledger_postings_org ON ledger_postings (org_id, id DESC);
CREATE INDEX ledger_postings_org_charges ON ledger_postings (org_id, at) WHERE kind IN ('charge', 'usage');
CREATE INDEX ledger_postings_charges_at ON ledger_postings (at) WHERE kind IN ('charge', 'usage');
CREATE INDEX ledger_postings_workload ON ledger_postings (workload_id) INCLUDE (amount_micros)
    WHERE workload_id IS NOT NULL;

CREATE TABLE ledger_entries (
    posting_id    uuid NOT NULL REFERENCES ledger_postings (id),
    account       text NOT NULL REFERENCES ledger_accounts (name),
    org_id        uuid,
    -- Positive: value held by (or attributed to) the account.
    amount_micros bigint NOT NULL CHECK (amount_micros <> 0),
    PRIMARY KEY (posting_id, account)
);
CREATE INDEX ledger_entries_account ON ledger_entries (account) INCLUDE (amount_micros);

-- Every posting balances: checked at commit for each posting written, from either side.
CREATE FUNCTION ledger_posting_balanced() RETURNS trigger AS $$
DECLARE
    pid   uuid;
    total numeric;
    n     integer;
BEGIN
    IF TG_TABLE_NAME = 'ledger_postings' THEN
        pid := NEW.id;
    ELSE
        pid := NEW.posting_id;
    END IF;
    SELECT coalesce(sum(amount_micros), 0), count(*) INTO total, n
    FROM ledger_entries WHERE posting_id = pid;
    IF n < 2 OR total <> 0 THEN
        RAISE EXCEPTION 'ledger posting % is unbalanced (% entries summing to %)', pid, n, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER ledger_postings_balanced AFTER INSERT ON ledger_postings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_posting_balanced();
CREATE CONSTRAINT TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_posting_balanced();

CREATE FUNCTION ledger_is_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: post a correcting entry instead'
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER ledger_postings_append_only BEFORE UPDATE OR DELETE ON ledger_postings
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

-- An org's credit terms and what kiln-billing last decided about it.
CREATE TABLE billing_settings (
    org_id                uuid PRIMARY KEY REFERENCES orgs (id) ON DELETE CASCADE,
    -- How far the paid balance may go below zero. New orgs may run up to 100 USD on credit
    -- until an operator says otherwise.
    credit_limit_micros   bigint NOT NULL DEFAULT 100000000 CHECK (credit_limit_micros >= 0),
    monthly_budget_micros bigint CHECK (monthly_budget_micros > 0),
    -- When kiln-billing first saw the org out of credit; cleared when it is back in credit.
    credit_exhausted_at   timestamptz,
    -- The highest budget alert (percent) raised for budget_alert_month.
    budget_alert_month    date,
    budget_alert_percent  integer,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_settings_exhausted ON billing_settings (credit_exhausted_at)
    WHERE credit_exhausted_at IS NOT NULL;

-- Every org has its settings row and its balance account from birth.
CREATE FUNCTION org_billing_created() RETURNS trigger AS $$
BEGIN
    INSERT INTO billing_settings (org_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    INSERT INTO ledger_accounts (name, org_id, kind)
    VALUES ('org:' || NEW.id || ':balance', NEW.id, 'balance') ON CONFLICT DO NOTHING;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER org_billing_created AFTER INSERT ON orgs
    FOR EACH ROW EXECUTE FUNCTION org_billing_created();

INSERT INTO billing_settings (org_id) SELECT id FROM orgs ON CONFLICT DO NOTHING;
INSERT INTO ledger_accounts (name, org_id, kind)
SELECT 'org:' || id || ':balance', id, 'balance' FROM orgs ON CONFLICT DO NOTHING;

-- How far each workload's history has been rated. Raters lock the row (SKIP LOCKED), rate
-- [rated_until, now) and move it in the transaction that posts the charges, so two raters
-- never rate the same period.
CREATE TABLE billing_rating_cursors (
    workload_id uuid PRIMARY KEY REFERENCES workloads (id) ON DELETE CASCADE,
    org_id      uuid NOT NULL,
    rated_until timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION workload_rating_cursor() RETURNS trigger AS $$
BEGIN
    INSERT INTO billing_rating_cursors (workload_id, org_id, rated_until)
    VALUES (NEW.id, NEW.org_id, NEW.created_at) ON CONFLICT DO NOTHING;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER workload_rating_cursor AFTER INSERT ON workloads
    FOR EACH ROW EXECUTE FUNCTION workload_rating_cursor();

INSERT INTO billing_rating_cursors (workload_id, org_id, rated_until)
SELECT id, org_id, created_at FROM workloads ON CONFLICT DO NOTHING;

-- Workloads kiln-billing stopped because their org ran out of credit; they are queued again
-- (and the row removed) once the org is back in credit.
CREATE TABLE billing_suspensions (
    workload_id    uuid PRIMARY KEY REFERENCES workloads (id) ON DELETE CASCADE,
    org_id         uuid NOT NULL,
    previous_state text NOT NULL,
    suspended_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_suspensions_org ON billing_suspensions (org_id);

-- Monthly invoices: lines as kiln-billing-core groups them (product, GPU type, detail).
-- A draft is regenerated on demand; a final one (after the month closed) never changes.
CREATE TABLE invoices (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    month        date NOT NULL CHECK (extract(day FROM month) = 1),
    status       text NOT NULL CHECK (status IN ('draft', 'final')),
    currency     text NOT NULL DEFAULT 'USD',
    total_micros bigint NOT NULL,
    lines        jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, month)
);

-- Months whose final invoices kiln-billing has written (so it closes each month once).
CREATE TABLE billing_month_closes (
    month     date PRIMARY KEY CHECK (extract(day FROM month) = 1),
    invoices  integer NOT NULL,
    closed_at timestamptz NOT NULL DEFAULT now()
);
