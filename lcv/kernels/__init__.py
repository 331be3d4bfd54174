"""Attention backends with one contract (docs/internals.md): attention / forward / backward on
q [B, T, N, H], k/v [B, S, K, H] and interval masks (q_lo, q_hi, k_idx), returning (o, lse).

`blockwise` is plain jnp (any platform); `flash_gpu` (portable), `flash_hopper` (sm_90, Mosaic GPU;
`gpu` picks between them) and `flash_tpu` are Pallas kernels. Import
the module you need; this package init imports none of them.

Every backend's custom VJP names its (o, lse) residuals with `name_residuals`, so the decoder's
`remat="attention"` policy can keep them and the backward never re-runs an attention forward.
"""

from jax.ad_checkpoint import checkpoint_name

RESIDUAL_NAMES = ("attention_out", "attention_lse")


def name_residuals(o, lse):
  """(o, lse) tagged for `jax.checkpoint` policies (`save_only_these_names(*RESIDUAL_NAMES)`)."""
  return checkpoint_name(o, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])
