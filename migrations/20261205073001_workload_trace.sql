-- The W3C `traceparent` of the request that created a workload ('' when tracing was off): the
-- scheduler places it under that trace, so one trace follows the work to the node.
ALTER TABLE workloads ADD COLUMN trace_parent text NOT NULL DEFAULT '';
