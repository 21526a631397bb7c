"""Drop-in: after `install()`, the original libraries' import paths resolve to the bridge.

Each family registers the modules it stands in for (`register("flash_attn", flash_attn_func=...)`);
`install()` puts one synthetic module per registered name into sys.modules, parents before
children, so `import flash_attn`, `from flash_attn import flash_attn_func` and
`import flash_attn.flash_attn_interface` all find the bridge. It also makes a `flash-attn`
distribution visible to importlib.metadata (torch_bridge/_distribution.py), since libraries such as
transformers check the installed package before importing it: call `install()` before importing them.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

_REGISTRY: dict[str, dict[str, Any]] = {}
_SAVED: dict[str, types.ModuleType | None] = {}


def register(module: str, **attrs: Any) -> None:
  """Declares that `module` (a dotted import path of an original library) exposes `attrs`."""
  _REGISTRY.setdefault(module, {}).update(attrs)


def registered() -> dict[str, tuple[str, ...]]:
  return {name: tuple(sorted(attrs)) for name, attrs in _REGISTRY.items()}


def _make(name: str, attrs: dict[str, Any]) -> types.ModuleType:
  module = types.ModuleType(name, f"torch_bridge stand-in for {name}")
  # A spec and a __path__ make it a package that importlib can both find and descend into.
  module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
  module.__path__ = []
  module.__torch_bridge__ = True
  for key, value in attrs.items():
    setattr(module, key, value)
  return module


def install() -> list[str]:
  """Makes every registered module importable; returns their names. Calling it again is harmless."""
  import torch_bridge  # noqa: F401  (importing the package registers every family)
  from torch_bridge import _distribution  # pylint: disable=g-import-not-at-top

  _distribution.install()

  names = sorted(set(_REGISTRY) | {p for n in _REGISTRY for p in _parents(n)}, key=lambda n: n.count("."))
  for name in names:
    current = sys.modules.get(name)
    if current is not None and getattr(current, "__torch_bridge__", False):
      for key, value in _REGISTRY.get(name, {}).items():
        setattr(current, key, value)
      continue
    _SAVED.setdefault(name, current)
    module = _make(name, _REGISTRY.get(name, {}))
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
      setattr(sys.modules[parent], child, module)
  return names


def uninstall() -> None:
  """Restores whatever those import paths resolved to before `install()`, and hides the
  distribution metadata again."""
  from torch_bridge import _distribution  # pylint: disable=g-import-not-at-top

  _distribution.uninstall()
  for name, previous in sorted(_SAVED.items(), key=lambda kv: -kv[0].count(".")):
    if previous is None:
      sys.modules.pop(name, None)
    else:
      sys.modules[name] = previous
  _SAVED.clear()


def _parents(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]
