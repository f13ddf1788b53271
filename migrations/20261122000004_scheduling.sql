-- Scheduling: workloads waiting for or holding capacity, and the capacity they hold.
--
-- The database, not the scheduler's code, makes double allocation impossible: every GPU a
-- workload holds is a row in gpu_allocations, and two exclusion constraints forbid (a) two
-- different sharing modes on one GPU and (b) two allocations whose slot ranges overlap on one
-- GPU. A whole GPU takes the full range; a MIG slice its memory slices [start, start+size); a
-- time-sliced share a range of the GPU's memory in MiB. Node CPU, memory and disk are counters
-- moved by conditional UPDATEs that cannot go past the node's capacity. So two scheduler
-- replicas racing for the same GPU cannot both commit.

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- Any unit of work the scheduler places: a pod, an instance, or one replica of an endpoint.
CREATE TABLE workloads (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind IN ('pod', 'instance', 'endpoint_replica')),
    name             text NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN
                       ('pending', 'scheduled', 'starting', 'running', 'stopping', 'stopped',
                        'terminated', 'failed')),
    state_reason     text NOT NULL DEFAULT '',
    state_changed_at timestamptz NOT NULL DEFAULT now(),
    tier             text NOT NULL DEFAULT 'on_demand' CHECK (tier IN ('on_demand', 'spot')),
    priority         integer NOT NULL DEFAULT 0,
    -- What it asks for. gpu_mode 'none' is a CPU-only workload.
    gpu_mode         text NOT NULL CHECK (gpu_mode IN ('none', 'whole', 'passthrough', 'mig', 'share')),
    gpu_type         text,
    gpu_count        integer NOT NULL DEFAULT 0 CHECK (gpu_count BETWEEN 0 AND 8),
    mig_profile      text,
    share_memory_mib bigint,
    cpu_millis       bigint NOT NULL CHECK (cpu_millis >= 0),
    memory_mib       bigint NOT NULL CHECK (memory_mib >= 0),
    disk_gib         bigint NOT NULL DEFAULT 0 CHECK (disk_gib >= 0),
    -- Kind-specific desired state for the agent (image, command, env, ports, ...).
    spec             jsonb NOT NULL DEFAULT '{}',
    -- Where it runs, once placed.
    node_id          uuid REFERENCES nodes (id),
    assignment_id    uuid UNIQUE,
    placed_at        timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((gpu_mode = 'none') = (gpu_type IS NULL)),
    CHECK (gpu_mode <> 'mig' OR mig_profile IS NOT NULL),
    CHECK (gpu_mode <> 'share' OR share_memory_mib > 0),
    CHECK (gpu_mode NOT IN ('whole', 'passthrough') OR gpu_count > 0),
    CHECK (state <> 'pending' OR node_id IS NULL)
);
-- The scheduler's queue: pending work, highest priority first, then oldest.
CREATE INDEX workloads_pending ON workloads (priority DESC, created_at, id) WHERE state = 'pending';
CREATE INDEX workloads_node ON workloads (node_id) WHERE node_id IS NOT NULL;
CREATE INDEX workloads_org ON workloads (org_id, kind, created_at);

-- What each placed workload holds on each GPU.
CREATE TABLE gpu_allocations (
    workload_id uuid NOT NULL REFERENCES workloads (id) ON DELETE CASCADE,
    node_id     uuid NOT NULL,
    gpu_uuid    text NOT NULL,
    mode        text NOT NULL CHECK (mode IN ('whole', 'mig', 'share')),
    slots       int8range NOT NULL CHECK (NOT isempty(slots)),
    -- MIG only: the profile, for operators and the agent.
    mig_profile text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workload_id, gpu_uuid),
    FOREIGN KEY (node_id, gpu_uuid) REFERENCES node_gpus (node_id, uuid),
    -- One sharing mode per GPU at a time.
    EXCLUDE USING gist (node_id WITH =, gpu_uuid WITH =, mode WITH <>),
    -- Never two holders of the same slot.
    EXCLUDE USING gist (node_id WITH =, gpu_uuid WITH =, slots WITH &&)
);

-- What placed workloads hold of each node's CPU, memory and disk; moved only by conditional
-- UPDATEs that refuse to exceed the node's registered capacity.
ALTER TABLE nodes
    ADD COLUMN cpu_millis_allocated bigint NOT NULL DEFAULT 0 CHECK (cpu_millis_allocated >= 0),
    ADD COLUMN memory_mib_allocated bigint NOT NULL DEFAULT 0 CHECK (memory_mib_allocated >= 0),
    ADD COLUMN disk_gib_allocated   bigint NOT NULL DEFAULT 0 CHECK (disk_gib_allocated >= 0);
