"""``python -m diffem_cli`` (also what ``accelerate launch -m diffem_cli`` runs).

Python puts the working directory first on ``sys.path`` for ``-m``; it comes off before anything
else is imported, so a file there named like a module diffem uses (``yaml.py``, ``torch.py``)
is never imported in its place. ``python -P`` (safe path) already leaves it off; a working
directory also put on the path on purpose (``PYTHONPATH``) stays, entry and all, so that plugin
discovery still tells the implicit entry from the deliberate one.
"""

import os
import sys


def _drop_working_directory() -> None:
    """Remove the entry ``python -m`` put first on ``sys.path`` when it is the working directory."""
    if sys.flags.safe_path or not sys.path:
        return
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # the working directory was removed: nothing to import from it
        return
    first = os.path.realpath(sys.path[0] or os.curdir)
    deliberate = {os.path.realpath(e) for e in sys.path[1:] if e}
    if first == here and here not in deliberate:
        del sys.path[0]


_drop_working_directory()

from diffem_cli.cli.app import main  # noqa: E402

main()
