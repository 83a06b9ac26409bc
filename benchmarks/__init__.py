"""Scripts that measure what the README and docs/results.md quote; each writes JSON (run as
`python -m benchmarks.NAME`, from the repository root)."""
