-- How long the agent spent inside the container runtime (Docker API calls) bringing up the
-- observed generation (protocol minor 3): the rest of create-to-running is the control plane's.
ALTER TABLE node_observed ADD COLUMN runtime_ms bigint NOT NULL DEFAULT 0 CHECK (runtime_ms >= 0);

-- Where tenants reach the ports a node publishes (protocol minor 3); '' means its hostname.
ALTER TABLE nodes ADD COLUMN public_address text NOT NULL DEFAULT '';
