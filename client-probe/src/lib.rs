//! maas-probe: runs on the protected host; talks REST and the block protocols only.
