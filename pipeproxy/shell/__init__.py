"""The trio shell: sockets, listeners, signals and the health endpoint around the core."""
