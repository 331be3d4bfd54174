"""Attention backends with one contract (docs/internals.md): attention / forward / backward on
q [B, T, N, H], k/v [B, S, K, H] and interval masks (q_lo, q_hi, k_idx), returning (o, lse).

`blockwise` is plain jnp (any platform); `flash_gpu` (portable), `flash_hopper` (sm_90, Mosaic GPU;
`gpu` picks between them) and `flash_tpu` are Pallas kernels. Import
the module you need; this package init imports none of them.
"""
