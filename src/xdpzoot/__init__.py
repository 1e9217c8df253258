"""xdpzoot: the data plane of an ISP edge router and the controller that feeds it."""

__version__ = "0.1.0"
