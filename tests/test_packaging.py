"""`pip install .` alone: the moed distribution carries moed_client, from a checkout and from its sdist.

Built the way pip builds (setuptools' PEP 517 backend, isolated build env from the configured index);
the wheel is installed with --no-deps into a private target dir and imported from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def pip(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], cwd=cwd, check=True, timeout=120,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))


def build_sdist(out: Path) -> Path:
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    name = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                          timeout=120).stdout.split()[-1]
    return out / name


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    pip("wheel", "--no-deps", str(ROOT), "-w", str(tmp / "checkout"), cwd=tmp)
    sdist = build_sdist(tmp)
    pip("wheel", "--no-deps", str(sdist), "-w", str(tmp / "sdist"), cwd=tmp)
    return {"checkout": next((tmp / "checkout").glob("moed-*.whl")), "sdist": next((tmp / "sdist").glob("moed-*.whl")),
            "sdist_archive": sdist}


@pytest.mark.parametrize("origin", ["checkout", "sdist"])
def test_wheel_holds_both_packages_and_needs_no_moed_client_distribution(wheels, origin):
    with zipfile.ZipFile(wheels[origin]) as z:
        names = set(z.namelist())
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for needed in ("moed_client/protocol.py", "moed_client/client.py", "moed/cli/__init__.py", "moed/front/main.py",
                   "moed/embedded/model/config.json"):
        assert needed in names, needed
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if r.lower().startswith(("moed-client", "moed_client"))], requires
    assert any(r.startswith("pyzmq") for r in requires) and any(r.startswith("msgpack") for r in requires)


def test_sdist_carries_the_client_sources(wheels):
    with tarfile.open(wheels["sdist_archive"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert "client/moed_client/protocol.py" in names


def test_installed_wheel_imports_from_its_own_files(wheels, tmp_path):
    target = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(target), str(wheels["sdist"]), cwd=tmp_path)
    code = ("import moed_client, moed.cli, moed.front.main; print(moed_client.__file__); print(moed.cli.__file__); "
            "from moed.models import embedded_model_path; print(embedded_model_path().joinpath('config.json').is_file())")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=60).stdout.split()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target)), out
    assert out[2] == "True"


def test_light_client_still_builds_alone(tmp_path):
    pip("wheel", "--no-deps", str(ROOT / "client"), "-w", str(tmp_path), cwd=tmp_path)
    wheel = next(tmp_path.glob("moed_client-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "moed_client/protocol.py" in names
    assert not [n for n in names if n.startswith("moed/")], names
