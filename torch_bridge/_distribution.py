"""Makes the `flash-attn` distribution visible to importlib.metadata, for this process only.

Libraries that gate on the installed package (transformers asks
`importlib.metadata.packages_distributions()` for a `flash-attn` distribution owning `flash_attn`,
then its version) never look at sys.modules, so `compat.install()` also adds a finder to
sys.meta_path that reports one in-memory distribution: name `flash-attn`, the API level we mirror as
version, top-level package `flash_attn`. Nothing is written to disk. When a real flash-attn is
installed, its metadata is left as it is (and a warning says so).
"""
from __future__ import annotations

import importlib.abc
import importlib.metadata
import re
import sys
import warnings

NAME = "flash-attn"
VERSION = "2.8.0"  # the flash-attn API level mirrored (torch_bridge.flash_attn's __version__)


def _normalized(name: str) -> str:
  return re.sub(r"[-_.]+", "_", name).lower()


class _Distribution(importlib.metadata.Distribution):
  """Metadata only: no files (`files` is None, as for a distribution without a RECORD)."""

  _TEXT = {
      "METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
                  "Summary: torch_bridge stand-in for flash-attn (pallas-attn kernels)\n",
      "top_level.txt": "flash_attn\n",
  }

  def read_text(self, filename):
    return self._TEXT.get(filename)

  def locate_file(self, path):
    raise FileNotFoundError(f"{NAME} (torch_bridge stand-in) has no files on disk: {path}")


class _Finder(importlib.abc.MetaPathFinder):
  """Finds no modules (compat's sys.modules entries serve the imports), only the distribution."""

  def find_spec(self, fullname, path=None, target=None):
    del fullname, path, target
    return None

  def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
    if context.name is None or _normalized(context.name) == _normalized(NAME):
      yield _Distribution()


_FINDER = _Finder()


def installed_elsewhere() -> str | None:
  """The version of a real flash-attn distribution, if one is installed; else None."""
  if _FINDER in sys.meta_path:
    return None
  try:
    return importlib.metadata.version(NAME)
  except importlib.metadata.PackageNotFoundError:
    return None


def install() -> bool:
  """Adds the distribution unless a real one exists; returns whether ours is visible now."""
  if _FINDER in sys.meta_path:
    return True
  real = installed_elsewhere()
  if real is not None:
    warnings.warn(f"torch_bridge.compat: a real {NAME} {real} is installed; its package metadata is "
                  f"left as it is (importlib.metadata reports that one), while the flash_attn "
                  f"imports resolve to torch_bridge", stacklevel=3)
    return False
  sys.meta_path.append(_FINDER)
  return True


def uninstall() -> None:
  if _FINDER in sys.meta_path:
    sys.meta_path.remove(_FINDER)
