"""`fab init`: start using deploy-kit in a Django project's own repository.

Finds what it can (where manage.py is, the module that defines the Celery app, the Django
project's name), then writes `fabfile.py` and a `hosts.toml` with every key documented (the
shipped `hosts.example.toml` with those values filled in). It never overwrites a file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from deploy_kit.errors import UsageError

FABFILE = '''"""Deploy tasks: every deploy-kit task (`fab --list`, `fab --help TASK`)."""

from deploy_kit.tasks import ns

# A task of your own: once `ns` is imported, fab lists only the tasks of `ns`, so a plain
# @task in this file is ignored; register yours on `ns`, beside deploy-kit's:
#
# from invoke import task
#
# @task
# def tests(c):
#     """Run the project's tests (locally) before a deploy."""
#     c.run("python manage.py test")
#
# ns.add_task(tests)
'''
_SKIP = {".git", ".venv", "venv", "node_modules", "__pycache__", "site-packages", ".tox", "build", "dist"}
_SETTINGS = re.compile(r"""DJANGO_SETTINGS_MODULE["']\s*,\s*["']([\w.]+)["']""")
# `app = Celery("name")` or `app = celery.Celery("name")`; the first argument is the main name.
_CELERY = re.compile(r"""^\s*\w+\s*=\s*(?:celery\.)?Celery\(\s*(?:["']([\w.-]+)["'])?""", re.M)


@dataclass
class Project:
    """What `init` found in a repository (pure data; `detect` reads the files)."""

    root: Path
    repo: str = "."  # the repository's top, relative to the directory the files are written to
    path: str = ""  # directory of manage.py, relative to the repository's top ("" at the top)
    name: str = ""
    celery_app: str = ""
    requirements: str = ""
    missing: list[str] = field(default_factory=list)  # keys to fill by hand, with why


def _files(root: Path, name: str) -> list[Path]:
    found = [p for p in root.rglob(name) if not _SKIP.intersection(p.relative_to(root).parts)]
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def _app_name(value: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:40]


def detect(root: Path, near: Path | None = None) -> Project:
    """What `root` (a repository's top) holds; a manage.py under `near` (where init runs) comes first."""
    project = Project(root=root)
    candidates = _files(root, "manage.py")
    if near is not None:
        candidates.sort(key=lambda p: not p.is_relative_to(near))  # stable: shallowest first in each group
    manage = next(iter(candidates), None)
    if manage is None:
        project.missing.append("app.path: no manage.py found in this repository; set the directory that holds it")
        base = root
    else:
        base = manage.parent
        project.path = "" if base == root else base.relative_to(root).as_posix()
        match = _SETTINGS.search(manage.read_text(errors="replace"))
        if match:
            project.name = _app_name(match.group(1).split(".")[0])
    apps = [(p, m) for p in (*_files(base, "celery.py"), *_files(base, "celery_app.py"))
            if (m := _CELERY.search(p.read_text(errors="replace")))]
    if apps:
        module, match = apps[0]
        project.celery_app = ".".join(module.relative_to(base).with_suffix("").parts)
        if match.group(1):  # Celery("shop") names the project better than a settings package ("config")
            project.name = _app_name(match.group(1))
    else:
        project.missing.append("app.celery_app: no module defining `app = Celery(...)` found (looked in "
                               "*/celery.py and */celery_app.py); set the import path given to `celery -A`")
    if not project.name:
        project.missing.append("app.name: the project's name could not be read from manage.py's settings "
                               "module nor from Celery(\"name\")")
    if (base / "requirements.txt").exists():
        project.requirements = "requirements.txt"
    else:
        project.missing.append(f"app.requirements: no requirements.txt next to manage.py in {base}; "
                               "set the requirements file, relative to app.path")
    return project


_EXAMPLE_INTRO = ("# deploy-kit configuration. Copy this file to hosts.toml (or point DEPLOY_KIT_CONFIG at\n"
                  "# your copy) and edit it. Every key is shown with its default; keys marked \"required\"\n"
                  "# have none.\n")
_INTRO = ("# deploy-kit configuration, read from ./hosts.toml (or the file DEPLOY_KIT_CONFIG names).\n"
          "# Every key is shown with its default; keys marked \"required\" have none.\n")


def hosts_toml(project: Project) -> str:
    """The documented example configuration with what was found filled in."""
    text = Path(__file__).with_name("hosts.example.toml").read_text()
    # This copy is the configuration itself, not an example to copy.
    text = text.replace(_EXAMPLE_INTRO, _INTRO, 1)

    def app_key(text: str, key: str, value: str) -> str:
        section = text.index("\n[app]\n")
        end = text.index("\n[", section + 1)
        body = re.sub(rf'^{key} = .*$', f'{key} = "{value}"', text[section:end], count=1, flags=re.M)
        return text[:section] + body + text[end:]

    text = app_key(text, "repo", project.repo)
    text = app_key(text, "path", project.path)
    for key in ("name", "celery_app", "requirements"):
        if getattr(project, key):
            text = app_key(text, key, getattr(project, key))
    if project.name:
        text = text.replace("/srv/myapp", f"/srv/{project.name}").replace("/etc/myapp/myapp.env",
                                                                        f"/etc/{project.name}/{project.name}.env")
        text = re.sub(r'^(user|group) = "myapp"$', rf'\1 = "{project.name}"', text, flags=re.M)
    header = ("# Written by deploy-kit's `init`: describe your stages' hosts, then run `setup`\n"
              "# (`fab setup` or `deploy-kit setup`).\n")
    if project.missing:
        header += "# Still to fill in by hand:\n" + "".join(f"#   - {m}\n" for m in project.missing)
    return header + text


def repository_top(directory: Path) -> Path:
    root = directory
    while not (root / ".git").exists() and root.parent != root:
        root = root.parent
    if not (root / ".git").exists():
        raise UsageError(f"{directory} is not inside a git repository: deploy-kit ships releases with "
                         "`git archive`. Fix: run `git init` and commit the project first")
    return root


def write(directory: Path) -> tuple[list[str], list[str], Project]:
    """Write fabfile.py and hosts.toml into `directory` (never over an existing file):
    (written, left alone, what was found)."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    directory = directory.resolve()
    root = repository_top(directory)
    project = detect(root, near=directory)
    # `repo` resolves against hosts.toml's directory, `path` is counted from the repository's top.
    project.repo = Path(os.path.relpath(root, directory)).as_posix()
    written, kept = [], []
    for name, content in (("fabfile.py", FABFILE), ("hosts.toml", hosts_toml(project))):
        path = directory / name
        if path.exists():
            kept.append(name)
            continue
        path.write_text(content)
        written.append(name)
    return written, kept, project
