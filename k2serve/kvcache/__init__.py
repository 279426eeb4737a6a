"""The paged MLA latent cache: block pool, block manager with prefix caching, and the shared block hash."""
