-- Identity and tenancy: users, orgs, memberships, sessions with refresh-token families,
-- the JWT signing key ring, API keys, idempotency records and the audit log.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL UNIQUE CHECK (email = lower(btrim(email)) AND email <> ''),
    name          text NOT NULL,
    password_hash text NOT NULL,
    is_operator   boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orgs (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    personal   boolean NOT NULL DEFAULT false,
    created_by uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    org_id     uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (user_id);

-- A session is one sign-in: one family of refresh tokens. Revoking it kills every token of the
-- family and, through the session check on each request, its access tokens.
CREATE TABLE sessions (
    id             uuid PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    revoked_at     timestamptz,
    revoked_reason text,
    ip             text,
    user_agent     text
);
CREATE INDEX sessions_by_user ON sessions (user_id);

CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set when the token is exchanged; a second exchange is reuse and revokes the session.
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

CREATE TABLE signing_keys (
    kid        text PRIMARY KEY,
    secret     bytea NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name         text NOT NULL,
    prefix       text NOT NULL,
    secret_hash  bytea NOT NULL UNIQUE,
    role         text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_by_org ON api_keys (org_id, id);

-- An Idempotency-Key is claimed in the same transaction as the effect it guards; a concurrent
-- duplicate blocks on the primary key until the first commits, then replays its answer.
CREATE TABLE idempotency_keys (
    scope           text NOT NULL,  -- the org (or '-' when the call has none)
    principal       text NOT NULL,  -- who called: usr_…, key_…, or a digest for anonymous calls
    key             text NOT NULL,
    request_hash    bytea NOT NULL,
    response_status integer NOT NULL,
    response_body   jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, principal, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

CREATE TABLE audit_events (
    id                bigserial PRIMARY KEY,
    org_id            uuid REFERENCES orgs (id) ON DELETE CASCADE,
    actor_user_id     uuid REFERENCES users (id) ON DELETE SET NULL,
    actor_api_key_id  uuid REFERENCES api_keys (id) ON DELETE SET NULL,
    action            text NOT NULL,
    target            text,
    ip                text,
    details           jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_by_org ON audit_events (org_id, id DESC);
CREATE INDEX audit_events_by_actor ON audit_events (actor_user_id, id DESC) WHERE org_id IS NULL;
