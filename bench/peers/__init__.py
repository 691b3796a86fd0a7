"""Peer trainers run with the same models, data, batch, steps, precision and threads as kdflow."""
