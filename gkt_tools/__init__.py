"""Tools that drive GKT Serve from outside: they start stacks, send load and break things; nothing imports them."""
