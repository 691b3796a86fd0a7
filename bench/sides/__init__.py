"""kdflow's side of a benchmark table, run as a user runs it (the peers are in bench/peers/)."""
