//! maas-manager: intent. REST API, catalog, scheduler, jobs, drills, auth, metrics and the web
//! console; binaries `maasd` and `maasctl`. Arrives with the "maasd and maasctl" issue.
