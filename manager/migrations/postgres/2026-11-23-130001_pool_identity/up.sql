-- The pool each catalog pool id is bound to: the UUID in the pool's superblock and the
-- directory it was last opened from. maasd refuses to start when the pool it finds is missing
-- or another one (a disk not mounted is never a reason to forget the catalog).
CREATE TABLE pools (
    id TEXT PRIMARY KEY NOT NULL,
    uuid TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    bound_ms BIGINT NOT NULL
);
