-- Per-org GPU quotas, per GPU type and product: the most GPUs (whole-GPU equivalents; a MIG
-- slice or a share counts its fraction, see kiln_placement::request_units) an org may hold at
-- once. No row means no limit. Operators set them; the scheduler enforces them when placing.
CREATE TABLE org_gpu_quotas (
    org_id     uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    gpu_type   text NOT NULL,
    product    text NOT NULL CHECK (product IN ('instance', 'pod', 'endpoint')),
    max_gpus   integer NOT NULL CHECK (max_gpus >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, gpu_type, product)
);
