"""The programs that run on hosts, and the one way they are shipped there.

Every file of this package runs on hosts with the host's own python3 (3.8+, stdlib only) and
imports its siblings the ordinary way (`from deploy_kit.remote import hostlib`), so the same
files are linted and unit-tested here. `program()` turns one of them into a single text that
a host's python3 runs from stdin or from a file: the package's modules travel inside it as
source and are loaded under their real names, then `main(params)` of the chosen one is called.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

from deploy_kit.remote import hostlib

# The modules a program may import; the loader adds them to sys.modules in this order.
MODULES = ("contracts", "hostlib", "probes", "agent_client", "celery_agent", "queues", "beat")


@cache
def source(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.py").read_text()


IMPORTS = re.compile(r"^\s*from deploy_kit\.remote(?:\.(\w+))? import ([\w, ]+)", re.MULTILINE)


@cache
def needs(name: str) -> tuple[str, ...]:
    """The package's modules NAME imports, directly or not, in MODULES order (what it ships with)."""
    found: set[str] = set()
    todo = [name]
    while todo:
        for module, names in IMPORTS.findall(source(todo.pop())):
            aliased = [n.split()[0] for n in names.split(",") if n.strip()]  # `import x as y` ships x
            for dependency in [module] if module else aliased:
                if dependency not in found:
                    found.add(dependency)
                    todo.append(dependency)
    return tuple(m for m in MODULES if m in found and m != name)


def program(name: str, params: dict[str, Any]) -> str:
    """The text of a program that runs `deploy_kit.remote.NAME.main(params)` on a host: NAME and
    the modules it imports, nothing else."""
    modules = [*needs(name), name]
    return hostlib.bundle([(m, source(m)) for m in modules], f"module.main(json.loads({json.dumps(params)!r}))\n")
