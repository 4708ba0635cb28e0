"""Device-side runtime: meshes, shardings, jitted step functions, paged KV cache, sampling."""
