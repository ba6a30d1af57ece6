"""The resumable stage engine: fingerprinted stage records, per-epoch checkpoints, cached teacher outputs."""
