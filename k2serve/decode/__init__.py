"""The decode worker: receives latent KV into its paged pool and decodes in continuous batches."""
