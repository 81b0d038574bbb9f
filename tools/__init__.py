"""Tools: benchmarks, memory/compile plans, rooflines, profile summaries, Hugging Face conversion."""
