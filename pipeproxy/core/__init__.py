"""The protocol core: SMTP in, actions out, with no I/O, no trio and no clock of its own."""
