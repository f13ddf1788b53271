-- What an endpoint lets its callers do, enforced by the gateways in Redis (token buckets and
-- in-flight sets, `kiln_ratelimit::admission`): per API key a sustained rate, a burst and calls
-- in flight (always bounded), and optionally the same for the endpoint in total.
ALTER TABLE endpoints
    ADD COLUMN key_rate_per_s    double precision NOT NULL DEFAULT 50
        CHECK (key_rate_per_s > 0 AND key_rate_per_s <= 100000),
    ADD COLUMN key_burst         integer NOT NULL DEFAULT 100
        CHECK (key_burst BETWEEN 1 AND 100000),
    ADD COLUMN key_concurrency   integer NOT NULL DEFAULT 32
        CHECK (key_concurrency BETWEEN 1 AND 100000),
    ADD COLUMN total_rate_per_s  double precision
        CHECK (total_rate_per_s > 0 AND total_rate_per_s <= 1000000),
    ADD COLUMN total_burst       integer CHECK (total_burst BETWEEN 1 AND 1000000),
    ADD COLUMN total_concurrency integer CHECK (total_concurrency BETWEEN 1 AND 1000000),
    ADD CHECK ((total_rate_per_s IS NULL) = (total_burst IS NULL));
