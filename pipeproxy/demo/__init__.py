"""What ``pipeproxy demo`` runs: a bundled strict legacy MTA and a pipelining client."""
