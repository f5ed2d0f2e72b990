"""Registering the transformers integration without importing transformers: a post-import hook on
`transformers.quantizers.auto` (the quantizer registry every `from_pretrained` imports). Standard library only, so
`import lplr_convert` stays as cheap as it was."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    quantizer = sys.modules.get(f"{__package__}.quantizer")
    if quantizer is not None and not hasattr(quantizer, "register"):
        return  # the quantizer module itself is being imported (it imported the registry): it registers at its end
    from .quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `transformers.quantizers.auto` with the other finders and registers lplr-convert once it has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # once is enough; the other finders locate the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers' quantizer registry is imported, else as soon as it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
