"""kdflow benchmarks (not tests): peers side by side, memory, channel, throughput. See bench/README.md."""
