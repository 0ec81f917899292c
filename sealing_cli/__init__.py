"""The `seal` command: thin commands over the packages that implement each role, the local-stack launcher and
the demos. Nothing outside this package imports it."""
