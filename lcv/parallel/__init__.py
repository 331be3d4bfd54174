"""Parallelism: the device mesh, logical-axis sharding rules, load-balanced token orders, and
attention over a sequence sharded on the `context` axis (ring, Ulysses, hybrid, all-gather).

Import the submodules: `lcv.parallel.mesh`, `.rules`, `.context`, `.ring_attention`, `.ulysses`.
Mesh axis names (`data`, `fsdp`, `context`, `tensor`) appear only in this package (DESIGN §1).
"""
