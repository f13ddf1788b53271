-- The fleet at work: what each node has (inventory, GPUs and their health), whether it is alive,
-- what the control plane wants on it (assignments, as a per-node revisioned event log), and what
-- its agent reports it sees.

-- A node's state is two independent facts: what the operator decided (admin_state) and whether
-- the node is talking to us (liveness). The single `state` operators and the scheduler read is
-- derived from both, so a cordoned node that goes silent and comes back is cordoned again, and
-- no code path can forget to combine them. Mirrors kiln_domain::NodeState::effective.
ALTER TABLE nodes DROP COLUMN state;
ALTER TABLE nodes
    ADD COLUMN admin_state text NOT NULL DEFAULT 'active'
        CHECK (admin_state IN ('active', 'cordoned', 'draining', 'retired')),
    ADD COLUMN liveness text NOT NULL DEFAULT 'online'
        CHECK (liveness IN ('online', 'unreachable', 'lost')),
    ADD COLUMN state text GENERATED ALWAYS AS (
        CASE
            WHEN admin_state = 'retired' THEN 'retired'
            WHEN liveness = 'lost' THEN 'lost'
            WHEN liveness = 'unreachable' THEN 'unreachable'
            WHEN admin_state = 'draining' THEN 'draining'
            WHEN admin_state = 'cordoned' THEN 'cordoned'
            ELSE 'ready'
        END) STORED,
    ADD COLUMN liveness_changed_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN admin_state_changed_at timestamptz NOT NULL DEFAULT now(),
    -- What the host told us at its last Register.
    ADD COLUMN registered_at timestamptz,
    ADD COLUMN protocol_minor integer,
    ADD COLUMN driver_version text NOT NULL DEFAULT '',
    ADD COLUMN cuda_version text NOT NULL DEFAULT '',
    ADD COLUMN cpu_cores integer NOT NULL DEFAULT 0 CHECK (cpu_cores >= 0),
    ADD COLUMN memory_mib bigint NOT NULL DEFAULT 0 CHECK (memory_mib >= 0),
    ADD COLUMN disk_gib bigint NOT NULL DEFAULT 0 CHECK (disk_gib >= 0),
    -- The newest revision of this node's assignment log (0: nothing ever assigned). Bumped under
    -- the node row's lock, so revisions are gap-free and strictly increasing per node.
    ADD COLUMN assignment_revision bigint NOT NULL DEFAULT 0 CHECK (assignment_revision >= 0),
    -- The newest revision the agent says it has applied; never goes down.
    ADD COLUMN applied_revision bigint NOT NULL DEFAULT 0 CHECK (applied_revision >= 0);

-- The controller scans silent nodes by heartbeat age.
CREATE INDEX nodes_liveness_heartbeat ON nodes (liveness, last_heartbeat_at)
    WHERE admin_state <> 'retired';

-- One row per GPU a node has ever registered. A GPU that disappears from the inventory keeps its
-- row (with removed_at) so history and future allocations that name it stay valid.
CREATE TABLE node_gpus (
    node_id          uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    uuid             text NOT NULL,
    idx              integer NOT NULL CHECK (idx >= 0),
    model            text NOT NULL,
    gpu_type         text,
    memory_mib       bigint NOT NULL CHECK (memory_mib >= 0),
    pci_bus_id       text NOT NULL,
    numa_node        integer,
    iommu_group      integer,
    mig_capable      boolean NOT NULL DEFAULT false,
    mig_enabled      boolean NOT NULL DEFAULT false,
    -- [{profile, start, size, uuid}] as the node reported them.
    mig_instances    jsonb NOT NULL DEFAULT '[]',
    nvlink_peers     text[] NOT NULL DEFAULT '{}',
    health           text NOT NULL DEFAULT 'healthy'
                     CHECK (health IN ('healthy', 'degraded', 'unhealthy')),
    health_reason    text NOT NULL DEFAULT '',
    health_changed_at timestamptz NOT NULL DEFAULT now(),
    -- The latest metrics sample (NULL: never sampled, or the device cannot tell).
    sampled_at       timestamptz,
    temperature_c    integer,
    power_w          double precision,
    sm_util_pct      integer,
    mem_util_pct     integer,
    memory_used_mib  bigint,
    ecc_corrected    bigint,
    ecc_uncorrected  bigint,
    removed_at       timestamptz,
    PRIMARY KEY (node_id, uuid)
);

-- What happened to GPUs that operators should see: XID errors and health changes.
CREATE TABLE gpu_events (
    id          bigserial PRIMARY KEY,
    node_id     uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    gpu_uuid    text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind IN ('xid', 'health')),
    code        integer,
    message     text NOT NULL DEFAULT ''
);
CREATE INDEX gpu_events_node_at ON gpu_events (node_id, at DESC);

-- The desired state of each node: one row per assignment (one pod or one instance placed there).
-- `spec` is the encoded kiln.node.v1.Assignment the agent receives; `gpu_uuids` is what it
-- occupies, for operators' "what runs on this GPU".
CREATE TABLE node_assignments (
    id          uuid PRIMARY KEY,
    node_id     uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    generation  bigint NOT NULL CHECK (generation > 0),
    kind        text NOT NULL CHECK (kind IN ('pod', 'instance')),
    spec        bytea NOT NULL,
    gpu_uuids   text[] NOT NULL DEFAULT '{}',
    revision    bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX node_assignments_node ON node_assignments (node_id);

-- The per-node change log the agent's stream replays from its last applied revision. An upsert
-- carries the full spec; a removal carries only the generation it supersedes.
CREATE TABLE node_assignment_events (
    node_id       uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    revision      bigint NOT NULL CHECK (revision > 0),
    assignment_id uuid NOT NULL,
    generation    bigint NOT NULL,
    op            text NOT NULL CHECK (op IN ('upsert', 'remove')),
    spec          bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, revision),
    CHECK ((op = 'upsert') = (spec IS NOT NULL))
);

-- What the agent last reported for each assignment (level-triggered: the newest report wins).
-- `state` 'lost' is written by the control plane when the node itself is declared lost.
CREATE TABLE node_observed (
    assignment_id uuid PRIMARY KEY,
    node_id       uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    generation    bigint NOT NULL,
    state         text NOT NULL CHECK (state IN
                    ('unknown', 'pending', 'starting', 'running', 'stopping', 'stopped', 'failed', 'lost')),
    reason        text NOT NULL DEFAULT '',
    exit_code     integer,
    ports         jsonb NOT NULL DEFAULT '[]',
    observed_at   timestamptz NOT NULL,
    reported_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX node_observed_node ON node_observed (node_id);
