"""`fab init`: start using deploy-kit in a Django project's own repository.

Finds what it can (where manage.py is, the module that defines the Celery app, the Django
project's name), then writes `fabfile.py` and a `hosts.toml` with every key documented (the
shipped `hosts.example.toml` with those values filled in). It never overwrites a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from deploy_kit.errors import UsageError

FABFILE = '''"""Deploy tasks: every deploy-kit task (`fab --list`); add your own beside them with ns.add_task()."""

from deploy_kit.tasks import ns  # noqa: F401
'''
_SKIP = {".git", ".venv", "venv", "node_modules", "__pycache__", "site-packages", ".tox", "build", "dist"}
_SETTINGS = re.compile(r"""DJANGO_SETTINGS_MODULE["']\s*,\s*["']([\w.]+)["']""")
_CELERY = re.compile(r"^\s*(\w+)\s*=\s*Celery\(", re.M)


@dataclass
class Project:
    """What `init` found in a repository (pure data; `detect` reads the files)."""

    root: Path
    path: str = ""  # directory of manage.py, relative to the root ("" at the top)
    name: str = ""
    celery_app: str = ""
    requirements: str = ""
    missing: list[str] = field(default_factory=list)  # keys to fill by hand, with why


def _files(root: Path, name: str) -> list[Path]:
    found = [p for p in root.rglob(name) if not _SKIP.intersection(p.relative_to(root).parts)]
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def detect(root: Path) -> Project:
    project = Project(root=root)
    manage = next(iter(_files(root, "manage.py")), None)
    if manage is None:
        project.missing.append("app.path: no manage.py found in this repository; set the directory that holds it")
        base = root
    else:
        base = manage.parent
        project.path = "" if base == root else base.relative_to(root).as_posix()
        match = _SETTINGS.search(manage.read_text(errors="replace"))
        if match:
            package = match.group(1).split(".")[0]
            project.name = re.sub(r"[^a-z0-9_-]", "-", package.lower())[:40]
    if not project.name:
        project.missing.append("app.name: the Django project's name could not be read from manage.py")
    modules = [p for p in (*_files(base, "celery.py"), *_files(base, "celery_app.py"))
               if _CELERY.search(p.read_text(errors="replace"))]
    if modules:
        module = modules[0].relative_to(base).with_suffix("")
        project.celery_app = ".".join(module.parts)
    else:
        project.missing.append("app.celery_app: no module defining `app = Celery(...)` found (looked in "
                               "*/celery.py and */celery_app.py); set the import path given to `celery -A`")
    if (base / "requirements.txt").exists():
        project.requirements = "requirements.txt"
    else:
        project.missing.append(f"app.requirements: no requirements.txt next to manage.py in {base}; "
                               "set the requirements file, relative to app.path")
    return project


def hosts_toml(project: Project) -> str:
    """The documented example configuration with what was found filled in."""
    text = Path(__file__).with_name("hosts.example.toml").read_text()

    def app_key(text: str, key: str, value: str) -> str:
        section = text.index("\n[app]\n")
        end = text.index("\n[", section + 1)
        body = re.sub(rf'^{key} = .*$', f'{key} = "{value}"', text[section:end], count=1, flags=re.M)
        return text[:section] + body + text[end:]

    text = app_key(text, "repo", ".")  # this repository, resolved against this file's directory
    text = app_key(text, "path", project.path)
    for key in ("name", "celery_app", "requirements"):
        if getattr(project, key):
            text = app_key(text, key, getattr(project, key))
    if project.name:
        text = text.replace("/srv/myapp", f"/srv/{project.name}").replace("/etc/myapp/myapp.env",
                                                                        f"/etc/{project.name}/{project.name}.env")
        text = re.sub(r'^(user|group) = "myapp"$', rf'\1 = "{project.name}"', text, flags=re.M)
    header = "# Written by `fab init`: fill in the stages' hosts, then `fab setup`.\n"
    if project.missing:
        header += "# Still to fill in by hand:\n" + "".join(f"#   - {m}\n" for m in project.missing)
    return header + text


def write(directory: Path) -> tuple[list[str], list[str], Project]:
    """Write fabfile.py and hosts.toml into `directory` (never over an existing file):
    (written, left alone, what was found)."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    root = directory
    while not (root / ".git").exists() and root.parent != root:
        root = root.parent
    if not (root / ".git").exists():
        raise UsageError(f"{directory} is not inside a git repository: deploy-kit ships releases with "
                         "`git archive`. Fix: run `git init` and commit the project first")
    project = detect(root)
    written, kept = [], []
    for name, content in (("fabfile.py", FABFILE), ("hosts.toml", hosts_toml(project))):
        path = directory / name
        if path.exists():
            kept.append(name)
            continue
        path.write_text(content)
        written.append(name)
    return written, kept, project
