"""Start using deploy-kit in your Django project: write fabfile.py and a documented hosts.toml."""

from pathlib import Path

from invoke import task

from deploy_kit import init as init_lib
from deploy_kit import ui


@task(help={"directory": "where to write fabfile.py and hosts.toml (default: here)"})
def init(c, directory="."):
    """Write fabfile.py and hosts.toml (every key documented, what could be found filled in); never overwrites."""
    console = ui.make_console()
    with ui.user_errors():
        written, kept, project = init_lib.write(Path(directory).resolve())
        for name in written:
            console.print(f"wrote {name}", markup=False)
        for name in kept:
            console.print(f"left {name} alone: it exists", markup=False)
        found = {"app.repo": f"{project.repo} (the repository's top, from hosts.toml's directory)",
                 "app.path": project.path or "(the top)", "app.name": project.name,
                 "app.celery_app": project.celery_app, "app.requirements": project.requirements}
        for key, value in found.items():
            if value:
                console.print(f"found {key} = {value}", markup=False)
        for missing in project.missing:
            console.print(f"fill in by hand: {missing}", markup=False)
        console.print("next: describe your stages' hosts in hosts.toml, then `setup --stage NAME` "
                      "(`fab setup` or `deploy-kit setup`)", markup=False)
