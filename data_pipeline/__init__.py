"""Writing image collections and 2-D benchmarks into WebDataset shards, and streaming them back."""
