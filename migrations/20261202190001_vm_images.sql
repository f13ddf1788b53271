-- The VM image catalog: what an instance boots. Operators manage it (`/v1/admin/images`);
-- tenants see active images (`GET /v1/images`) and name one when creating an instance. The
-- scheduler copies the row into each instance assignment (`kiln.node.v1.VmImage`), so the file
-- paths are the node's: absolute, or relative to the agent's `--vm-image-dir`.
CREATE TABLE vm_images (
    name         text PRIMARY KEY CHECK (name ~ '^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$'),
    description  text NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    -- Kernel and initrd empty: boot the disk's own boot loader.
    kernel       text NOT NULL DEFAULT '',
    initrd       text NOT NULL DEFAULT '',
    -- The base disk each instance's copy-on-write overlay backs onto; empty: a blank disk.
    disk         text NOT NULL DEFAULT '',
    kernel_args  text NOT NULL DEFAULT '',
    login_user   text NOT NULL DEFAULT 'root' CHECK (login_user ~ '^[a-z_][a-z0-9_-]{0,31}$'),
    -- Instances of this image ask for at least this much disk.
    min_disk_gib bigint NOT NULL DEFAULT 1 CHECK (min_disk_gib BETWEEN 1 AND 10240),
    -- 'active' images can be launched; 'deprecated' ones keep running but take no new instances.
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deprecated')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (kernel <> '' OR disk <> ''),
    CHECK (initrd = '' OR kernel <> '')
);
