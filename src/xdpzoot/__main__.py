"""``python -m xdpzoot``: the CLI (the lab starts its servers in namespaces this way)."""

from xdpzoot.cli import main

main()
