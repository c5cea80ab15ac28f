"""dmx: distributed matrix experiment runner for image-model divergence audits."""
__version__ = "0.1.0"


def _checkout_subpackages() -> None:
    """In a checkout, dmx's subpackages (runner/, matrix/, results/, analysis/) are folders beside
    this one; pyproject.toml's package-dir maps them into dmx, so an installed wheel has
    dmx/runner/... and an editable install resolves ``dmx.runner`` to runner/. Imported straight
    from a checkout (its root on sys.path: ``PYTHONPATH=.``, ``python -m`` there, a bench script),
    this finds them beside this dmx/ - even when another checkout is installed editable - and as
    ``dmx.runner`` only: no top-level ``runner`` is made importable."""
    import importlib.machinery
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return
    names = {f"{__name__}.{n}" for n in ("runner", "matrix", "results", "analysis")
             if not os.path.isdir(os.path.join(here, n))
             and os.path.isfile(os.path.join(root, n, "__init__.py"))}
    if not names or any(getattr(f, "_dmx_checkout", None) == root for f in sys.meta_path):
        return

    class _CheckoutFinder:
        _dmx_checkout = root

        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname not in names:
                return None
            return importlib.machinery.PathFinder.find_spec(fullname, [root])

    sys.meta_path.insert(0, _CheckoutFinder)   # before an editable install of another checkout


_checkout_subpackages()
