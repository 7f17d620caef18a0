"""The programs that run on hosts, and the one way they are shipped there.

Every file of this package runs on hosts with the host's own python3 (3.8+, stdlib only) and
imports its siblings the ordinary way (`from deploy_kit.remote import hostlib`), so the same
files are linted and unit-tested here. `program()` turns one of them into a single text that
a host's python3 runs from stdin or from a file: the package's modules travel inside it as
source and are loaded under their real names, then `main(params)` of the chosen one is called.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

# The modules a program may import; the loader adds them to sys.modules in this order.
MODULES = ("contracts", "hostlib", "celery_agent")

_LOADER = '''import json, sys, types
def _deploy_kit_load(sources):
    for name in ("deploy_kit", "deploy_kit.remote"):
        package = sys.modules.setdefault(name, types.ModuleType(name))
        package.__path__ = []
    for name, source in sources:
        module = types.ModuleType("deploy_kit.remote." + name)
        module.__file__ = "<deploy-kit %s>" % name
        module.__source__ = source
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        setattr(sys.modules["deploy_kit.remote"], name, module)
    return module
'''


@cache
def source(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.py").read_text()


def program(name: str, params: dict[str, Any]) -> str:
    """The text of a program that runs `deploy_kit.remote.NAME.main(params)` on a host."""
    modules = [m for m in MODULES if m != name] + [name]
    sources = json.dumps([(m, source(m)) for m in modules])
    return (f"{_LOADER}_deploy_kit_load(json.loads({sources!r})).main(json.loads({json.dumps(params)!r}))\n")
