"""Sample graphs and tool modules: what a newcomer runs first (see ``samples/README.md``)."""
