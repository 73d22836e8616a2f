"""Model folders: discovery, the torch definition loader, and consistency checks.

A model is a folder ``models/<name>/`` with ``manifest.toml`` (the contract:
features, output, artifacts), ``model.onnx`` (served), ``baseline.json``
(training distributions for drift), ``train.py`` and, for the torch backend and
the ONNX-vs-torch parity check, ``model.py`` (the ``nn.Module``, imported by
both ``train.py`` and the torch backend) with its trained ``state_dict``
``model.pt``.

Nothing here imports torch unless a torch path is taken.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

from workers.features import ModelSpec, repo_root

__all__ = ["load_definition", "discover", "models_root"]


def models_root() -> pathlib.Path:
    return repo_root() / "models"


def discover(root: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Model folders (those holding a manifest.toml) under ``root`` (default: the repository's models/)."""
    r = pathlib.Path(root) if root is not None else models_root()
    return sorted(p.parent for p in r.glob("*/manifest.toml"))


def load_definition(spec: ModelSpec) -> ModuleType:
    """Import ``[artifacts] torch_module`` (model.py) of a model; needs torch.

    Each model's module gets its own name (``sluice_models.<name>``), so two
    models' ``model.py`` never shadow each other in one process.
    """
    if spec.torch_module_path is None:
        raise ValueError(f"{spec.manifest_path}: no [artifacts] torch_module (model.py) for the torch definition")
    if not spec.torch_module_path.is_file():
        raise ValueError(f"{spec.torch_module_path}: torch definition not found ([artifacts] torch_module in {spec.manifest_path})")
    modname = f"sluice_models.{spec.name}"
    mod = sys.modules.get(modname)
    if mod is not None and getattr(mod, "__file__", None) == str(spec.torch_module_path):
        return mod
    ms = importlib.util.spec_from_file_location(modname, spec.torch_module_path)
    mod = importlib.util.module_from_spec(ms)
    sys.modules[modname] = mod
    try:
        ms.loader.exec_module(mod)  # type: ignore[union-attr]
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    if not callable(getattr(mod, "build", None)):
        raise ValueError(f"{spec.torch_module_path}: must define build(n_columns) -> torch.nn.Module")
    return mod
