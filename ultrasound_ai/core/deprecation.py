"""Old names kept for one release: modules that moved, command-line flags that were renamed.

A moved module's old file holds only

    alias_moved_module(__name__, "new.module.path")

which makes the old import path name the very same module object (private names and monkeypatching
included) and warns once with a DeprecationWarning saying where it went.

A renamed flag stays accepted through

    add_argument(parser, "--quiet", deprecated=("--no-progress",), action="store_true", help=...)

which adds one option under both spellings (same destination, same action) and, when an old spelling
is used, prints a warning naming the new one on stderr (never stdout, which may carry JSON).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Sequence

__all__ = ["alias_moved_module", "add_argument"]


def alias_moved_module(old_name: str, new_name: str) -> None:
    """Point sys.modules[old_name] at the module `new_name` (imported now) and warn about the move."""
    warnings.warn(f"{old_name} moved to {new_name}; the old path goes in the next release",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old_name] = importlib.import_module(new_name)


def add_argument(parser, *flags: str, deprecated: Sequence[str] = (), **kwargs) -> argparse.Action:
    """`parser.add_argument(*flags, **kwargs)` that also accepts the `deprecated` spellings, with a warning.

    The help text lists the new spellings only; the old ones are named at its end."""
    deprecated = tuple(deprecated)
    if deprecated and kwargs.get("help") not in (None, argparse.SUPPRESS):
        kwargs["help"] = f"{kwargs['help']} ({', '.join(deprecated)}: deprecated spelling)"
    action = parser.add_argument(*flags, *deprecated, **kwargs)
    if deprecated:
        new = flags[0]
        base = type(action)

        class _Deprecating(base):  # the same action, plus the warning
            def __call__(self, parser, namespace, values, option_string=None):
                if option_string in deprecated:
                    print(f"{parser.prog}: warning: {option_string} is deprecated and goes in the next release; "
                          f"use {new}", file=sys.stderr)
                super().__call__(parser, namespace, values, option_string)

        _Deprecating.__name__ = f"Deprecating{base.__name__}"
        action.__class__ = _Deprecating
    return action
