"""Triton kernels of fastcp (no autograd, no nn: launchers and @triton.jit kernels only).

Installed as ``fastcp.kernels`` through setuptools' package-dir. When Python runs from the
repository root, the root is on ``sys.path`` and this folder would shadow Hugging Face's
``kernels`` package, which transformers and diffusers probe for at import time. So under any
other name this module refuses to provide anything:

- if the real ``kernels`` distribution is installed, it loads that one in its place;
- otherwise it stays an empty stand-in without ``__file__`` (what transformers' probe reads as
  "not installed"), and every attribute access raises AttributeError.
"""
import os as _os
import sys as _sys

if __name__ != "fastcp.kernels":
    import importlib as _importlib
    import importlib.metadata as _metadata

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    try:
        _metadata.version(__name__)
        _has_real = True
    except _metadata.PackageNotFoundError:
        _has_real = False
    if _has_real:
        _name, _saved = __name__, list(_sys.path)
        del _sys.modules[_name]
        _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _root]
        try:
            # The import system returns whatever sits in sys.modules after this body runs.
            _sys.modules[_name] = _importlib.import_module(_name)
        finally:
            _sys.path[:] = _saved
    else:
        __file__ = None  # noqa: F811 - an installed package always has one; this is no package

        def __getattr__(name):
            # AttributeError (not ImportError) so getattr(module, "__version__", default) probes work;
            # `from kernels import x` still turns it into an ImportError with this message.
            raise AttributeError(
                f"'{__name__}' here is fastcp's Triton kernel folder, not Hugging Face's kernels package; "
                "import the kernels as fastcp.kernels"
            )
