"""How the `lm_eval` command learns the model name `mobilellm`.

lm-eval 0.4.x has no plugin mechanism for models (its registry only knows what its own
`lm_eval/models/__init__.py` lists, or classes imported before the CLI runs). So we install a
`.pth` file into site-packages: Python runs its one line at start-up, which adds an import hook
(costing nothing, importing nothing else). When a program imports `lm_eval.api.registry`, the hook
adds a lazy entry `mobilellm -> mobilellm.eval.lm_eval_adapter:MobileLLMAdapter`, so torch and our
model code are only imported when `--model mobilellm` is actually asked for.

    mobilellm lm-eval-hook            # install (into the running Python's site-packages)
    mobilellm lm-eval-hook --remove
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import site
import sys
import sysconfig
from pathlib import Path

REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_NAME = "mobilellm"
ADAPTER = "mobilellm.eval.lm_eval_adapter:MobileLLMAdapter"
PTH_FILE = "mobilellm-lm-eval.pth"
# Guarded: a Python without mobilellm importable must start silently.
PTH_LINE = ("import importlib.util as _u; _u.find_spec('mobilellm') and "
            "__import__('mobilellm.eval.lm_eval_hook', fromlist=['install']).install()\n")


class _RegisterAfterImport(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        if MODEL_NAME not in module.model_registry:
            module.model_registry.register(MODEL_NAME, target=ADAPTER)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


def install() -> None:
    """Add the import hook to this interpreter (what the .pth line calls)."""
    if REGISTRY_MODULE in sys.modules:  # lm_eval already imported: register directly
        registry = sys.modules[REGISTRY_MODULE].model_registry
        if MODEL_NAME not in registry:
            registry.register(MODEL_NAME, target=ADAPTER)
    elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())


def default_site_dir() -> Path:
    """Where pip installed lm_eval (the same environment must see the hook)."""
    if sys.prefix != sys.base_prefix or os.access(sysconfig.get_paths()["purelib"], os.W_OK):
        return Path(sysconfig.get_paths()["purelib"])
    return Path(site.getusersitepackages())


def write_pth(site_dir: Path) -> Path:
    from ..atomic import write_text_atomic  # here, not at the top: every Python start-up imports this module

    return write_text_atomic(Path(site_dir) / PTH_FILE, PTH_LINE)
