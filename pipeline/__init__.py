"""cocomix.pipeline: the CLI, presets, workspace layout and the offline quickstart."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cocomix")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
