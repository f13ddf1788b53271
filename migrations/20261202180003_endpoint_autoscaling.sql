-- How an endpoint scales between min_replicas and max_replicas (the scheduler's autoscaler
-- moves desired_replicas; the endpoint controller adds or removes replicas to match):
--   target_concurrency  calls in flight per replica it aims for;
--   scale_down_window_s a lower replica count must have been enough for this long before the
--                       autoscaler scales down to it (scaling up is immediate);
--   scale_to_zero_after_s with min_replicas = 0, no call for this long scales it to zero.
ALTER TABLE endpoints
    ADD COLUMN target_concurrency    integer NOT NULL DEFAULT 4
        CHECK (target_concurrency BETWEEN 1 AND 10000),
    ADD COLUMN scale_down_window_s   integer NOT NULL DEFAULT 60
        CHECK (scale_down_window_s BETWEEN 0 AND 86400),
    ADD COLUMN scale_to_zero_after_s integer NOT NULL DEFAULT 300
        CHECK (scale_to_zero_after_s BETWEEN 1 AND 604800);
