"""Attention kernels for serving (Pallas) with their pure-jnp references and one dispatcher.

Modules: `dispatch` (the entry point the runtime calls), `reference` (pure-jnp contract),
`ragged_prefill` and `paged_decode` (Pallas kernels), `lowering` (Triton / interpret choice),
`validation` (argument checks shared by every backend).
"""
