"""Expert parallelism: expert ownership, all-to-all dispatch and combine, EPLB placement."""
