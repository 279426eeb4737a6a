"""The prefill worker: computes prompts and ships their latent KV to a decode worker."""
