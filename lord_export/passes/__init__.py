"""FX graph passes: one pass per file, named for what it does; ``graph_utils`` holds what they share."""

from .factorize_linears import factorize_linears, find_sites
from .share_bottlenecks import share_bottlenecks

__all__ = ["factorize_linears", "find_sites", "share_bottlenecks"]
