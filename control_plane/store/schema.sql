-- The CA's schema (PostgreSQL 15+). control_plane.store applies it whole at every
-- start (Store.migrate: one write transaction, under the write lock), so every
-- statement here is idempotent: CREATE ... IF NOT EXISTS, CREATE OR REPLACE, and
-- in-place migrations that do nothing once done.
CREATE TABLE IF NOT EXISTS organizations (
    org_id          text PRIMARY KEY,
    display_name    text NOT NULL,
    policy          jsonb NOT NULL,
    policy_version  bigint NOT NULL DEFAULT 1,
    key_version     bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS zen_pools (
    name        text PRIMARY KEY,
    visibility  text NOT NULL CHECK (visibility IN ('public', 'private')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS zen_pool_orgs (
    pool    text NOT NULL REFERENCES zen_pools(name) ON DELETE CASCADE,
    org_id  text NOT NULL REFERENCES organizations(org_id) ON DELETE CASCADE,
    PRIMARY KEY (pool, org_id)
);
-- THE rule "pool P may receive org O's keys", for every query that asks it: a
-- public pool serves every org that is not private_zen_only; a private pool
-- serves the orgs bound to it, and those only. Its Python twin is
-- control_plane.authz.pool_serves (tests/control_plane/store/test_pools.py holds
-- the two to one table of cases).
CREATE OR REPLACE VIEW pool_orgs_served AS
SELECT p.name AS pool, o.org_id
FROM zen_pools p
JOIN organizations o ON CASE
    WHEN p.visibility = 'public' THEN NOT coalesce((o.policy->>'private_zen_only')::boolean, false)
    ELSE EXISTS (SELECT 1 FROM zen_pool_orgs b WHERE b.pool = p.name AND b.org_id = o.org_id)
END;
CREATE TABLE IF NOT EXISTS intermediate_keys (
    key_id          uuid PRIMARY KEY,
    org_id          text NOT NULL REFERENCES organizations(org_id),
    state           text NOT NULL CHECK (state IN ('pending', 'active')),
    version         bigint,
    algorithm       text NOT NULL,
    keylib_format   text NOT NULL,
    spki_sha256     bytea NOT NULL,
    sealed_key      bytea NOT NULL,
    certificate_pem text,
    chain_pem       text,
    subject         text,
    serial_hex      text,
    not_before      timestamptz,
    not_after       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    activated_at    timestamptz,
    CHECK ((state = 'active') = (certificate_pem IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS intermediate_keys_one_active
    ON intermediate_keys (org_id) WHERE state = 'active';
CREATE UNIQUE INDEX IF NOT EXISTS intermediate_keys_one_pending
    ON intermediate_keys (org_id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS intermediate_history (
    key_id        uuid PRIMARY KEY,
    org_id        text NOT NULL,
    state         text NOT NULL CHECK (state IN ('rotated', 'revoked', 'discarded')),
    version       bigint,
    algorithm     text NOT NULL,
    spki_sha256   bytea NOT NULL,
    subject       text,
    serial_hex    text,
    not_before    timestamptz,
    not_after     timestamptz,
    created_at    timestamptz NOT NULL,
    activated_at  timestamptz,
    ended_at      timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS key_events (
    seq             bigserial PRIMARY KEY,
    org_id          text NOT NULL,
    kind            text NOT NULL,
    key_id          text NOT NULL DEFAULT '',
    version         bigint NOT NULL DEFAULT 0,
    policy_version  bigint NOT NULL DEFAULT 0,
    -- The pools the event is for, fixed when it is written (control_plane/store/events.py).
    audience        text[] NOT NULL DEFAULT '{}',
    at              timestamptz NOT NULL DEFAULT now()
);
-- Events reference a policy version, never carry the policy: a replay of the
-- log costs rows of a few hundred bytes, however large policies are.
ALTER TABLE key_events DROP COLUMN IF EXISTS policy;
-- The audience was once a word ('' every pool serving the org, 'public' every
-- public pool, 'pool:<name>' one pool) that each delivery read against the pools
-- and orgs of the moment: now it is the pools themselves. Old rows get the pools
-- their word names at the time of this migration.
DO $$
BEGIN
    IF (SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()
        AND table_name = 'key_events' AND column_name = 'audience') = 'text' THEN
        ALTER TABLE key_events RENAME COLUMN audience TO audience_word;
        ALTER TABLE key_events ADD COLUMN audience text[] NOT NULL DEFAULT '{}';
        UPDATE key_events e SET audience = CASE
            WHEN left(e.audience_word, 5) = 'pool:' THEN ARRAY[substr(e.audience_word, 6)]
            WHEN e.audience_word = 'public' THEN
                ARRAY(SELECT p.name FROM zen_pools p WHERE p.visibility = 'public' ORDER BY p.name)
            ELSE ARRAY(SELECT s.pool FROM pool_orgs_served s WHERE s.org_id = e.org_id ORDER BY s.pool)
        END WHERE e.kind <> 'genesis';
        ALTER TABLE key_events DROP COLUMN audience_word;
    END IF;
END $$;
-- after_seq 0 means "no replay" (proto3 cannot tell it from unset), so the first
-- real event must have seq >= 2: a ZEN told "the log ends at 0" would otherwise
-- resume with 0 and miss every event made while it was away. Never delivered.
INSERT INTO key_events (org_id, kind) SELECT '', 'genesis' WHERE NOT EXISTS (SELECT 1 FROM key_events);
CREATE TABLE IF NOT EXISTS request_log (
    request_id  text PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    result      jsonb NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
-- Key material and certificates must never be sampled into pg_statistic
-- (it would outlive a deleted row in every backup).
ALTER TABLE intermediate_keys ALTER COLUMN sealed_key SET STATISTICS 0;
ALTER TABLE intermediate_keys ALTER COLUMN certificate_pem SET STATISTICS 0;
ALTER TABLE intermediate_keys ALTER COLUMN chain_pem SET STATISTICS 0;
-- Stored as-is (no compression), so a byte-for-byte scan of a backup for a
-- retired key or certificate is meaningful.
ALTER TABLE intermediate_keys ALTER COLUMN sealed_key SET STORAGE EXTERNAL;
ALTER TABLE intermediate_keys ALTER COLUMN certificate_pem SET STORAGE EXTERNAL;
ALTER TABLE intermediate_keys ALTER COLUMN chain_pem SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS audit_events (
    seq        bigint PRIMARY KEY,
    at         timestamptz NOT NULL,
    actor      text NOT NULL,
    action     text NOT NULL,
    org_id     text NOT NULL DEFAULT '',
    key_id     text NOT NULL DEFAULT '',
    outcome    text NOT NULL,
    detail     text NOT NULL DEFAULT '',
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);
