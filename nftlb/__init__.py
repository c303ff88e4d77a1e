"""nftlb: a Layer-4 load balancer made of the kernel's own nftables."""

__version__ = "0.2.0"
