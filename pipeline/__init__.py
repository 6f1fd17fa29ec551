"""cocomix.pipeline: the roof: the CLI and the chained commands (quickstart, tokenize then extract)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cocomix")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
