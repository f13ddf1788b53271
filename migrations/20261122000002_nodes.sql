-- The fleet: GPU hosts (nodes) and the one-time bootstrap tokens an operator issues so a node
-- agent can join. Both secrets are kept only as SHA-256 digests.

CREATE TABLE nodes (
    id                    uuid PRIMARY KEY,
    hostname              text NOT NULL,
    state                 text NOT NULL DEFAULT 'ready'
                          CHECK (state IN ('ready', 'cordoned', 'draining', 'unreachable', 'lost', 'retired')),
    agent_version         text NOT NULL,
    -- Digest of the long-lived node credential the agent presents on every call but Join.
    credential_hash       bytea NOT NULL UNIQUE,
    credential_revoked_at timestamptz,
    joined_at             timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at     timestamptz
);

-- A token is spent by one atomic UPDATE … WHERE used_at IS NULL AND expires_at > now(), so two
-- agents racing with the same token cannot both join.
CREATE TABLE node_bootstrap_tokens (
    id           uuid PRIMARY KEY,
    token_hash   bytea NOT NULL UNIQUE,
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz,
    used_by_node uuid REFERENCES nodes (id) ON DELETE SET NULL,
    note         text NOT NULL DEFAULT '',
    CHECK (expires_at > created_at),
    CHECK (used_by_node IS NULL OR used_at IS NOT NULL)
);
