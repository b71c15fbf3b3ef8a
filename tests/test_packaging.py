"""The built distribution: it installs the package ``trioflow`` and no other top-level name.

The repository keeps its folders ``core/`` and ``web/``; the build maps them
to ``trioflow`` and ``trioflow.web``. A wheel built from this checkout is
installed into a new virtual environment and imported from there, away from
the checkout.
"""

from __future__ import annotations

import pathlib
import site
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

PROGRAM = """
import importlib.resources, importlib.util, pathlib, sys
import trioflow
from trioflow import Engine, EngineLimits, Registry, default_registry, open_engine
from trioflow.web import Settings, create_app
from trioflow.web.docs_page import STATIC_FILES
assert pathlib.Path(trioflow.__file__).is_relative_to(sys.prefix), trioflow.__file__
static = importlib.resources.files("trioflow.web").joinpath("static")
for path in STATIC_FILES:
    assert static.joinpath(*path.split("/")).read_bytes(), path
for name in ("core", "web", "samples", "tests", "bench"):
    assert importlib.util.find_spec(name) is None, name
print("ok", trioflow.__version__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("trioflow-*.whl")
    return built


def test_the_wheel_holds_only_the_trioflow_package(wheel: pathlib.Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"trioflow"}
    assert "trioflow/__init__.py" in names
    assert "trioflow/web/__init__.py" in names
    assert "trioflow/stores/sqlite.py" in names
    assert "trioflow/py.typed" in names and "trioflow/web/py.typed" in names
    # The /docs page's files (Swagger UI is vendored: no CDN), without source maps.
    from trioflow.web.docs_page import STATIC_FILES

    for path in STATIC_FILES:
        assert f"trioflow/web/static/{path}" in names, path
    assert not [name for name in names if name.endswith(".map")]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "trioflow = trioflow.web.cli:main" in text
    assert "builtin = trioflow.builtin_tools:register" in text


def test_the_wheel_installs_and_imports_as_trioflow(
    wheel: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    venv = tmp_path / "fresh"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The dependencies (trio, pydantic, starlette, ...) come from this test's
    # environment, added as a plain path: its .pth files (this checkout's own
    # editable install among them) are not read from there.
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    pathlib.Path(fresh_site, "dependencies.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n"
    )
    result = subprocess.run(
        [str(python), "-c", PROGRAM], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
    # The console script is installed and runs.
    cli = subprocess.run(
        [str(venv / "bin" / "trioflow"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert "serve" in cli.stdout
