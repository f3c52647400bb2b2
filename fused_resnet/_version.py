"""The package's version, on the floor of the import graph (standard library only): both the
info report and the tuning cache need it, and neither may import the other for it."""

from importlib import metadata

try:
    __version__ = metadata.version("fused_resnet")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
