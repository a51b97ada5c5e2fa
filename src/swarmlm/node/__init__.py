"""The integrated node: one process running swarm training, curation, web and alignment."""
