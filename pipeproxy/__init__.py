"""pipeproxy: an SMTP proxy that gives legacy MTAs PIPELINING.

Clients see a server that advertises and honours PIPELINING (RFC 2920); the upstream
sees one command at a time, never a byte early. See README.md.
"""
