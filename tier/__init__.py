"""Storage tiers of Quiver: L0 RAM arena, L1 local disk (a walpub volume) and
L2 object store (local directory or S3).  Empty until the tiers issue fills it;
it exists so the package layout is the one the design fixes."""
