"""The embedded model's data preparation: which packages the corpus takes, and the FIM rewrite."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import corpus  # noqa: E402
import data  # noqa: E402
from tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX  # noqa: E402

TEXT = "".join(f"line_{i} = {i}\n" for i in range(40))


def split_fim(doc: str) -> tuple[str, str, str]:
    assert doc.startswith(FIM_PREFIX)
    prefix, rest = doc[len(FIM_PREFIX):].split(FIM_SUFFIX)
    suffix, middle = rest.split(FIM_MIDDLE)
    return prefix, middle, suffix


def test_fim_keeps_the_text_and_mostly_asks_for_a_few_whole_lines():
    rng = np.random.default_rng(0)
    short = 0
    for _ in range(600):
        prefix, middle, suffix = split_fim(data.fim(TEXT, rng))
        assert prefix + middle + suffix == TEXT
        whole_lines = prefix.endswith("\n") and middle.endswith("\n")
        short += whole_lines and 1 <= middle.count("\n") <= 4
    assert 0.45 < short / 600 < 0.7  # half by design, plus long spans that happen to be short


def test_licenses_with_a_copyleft_part_are_refused():
    assert corpus.is_permissive("MIT") and corpus.is_permissive("Apache-2.0 OR BSD-2-Clause")
    for lic in ("MPL-2.0 AND MIT", "MIT AND MPL-2.0", "public domain, Python, 2-Clause BSD, GPL 3", "LGPL v3", "UNKNOWN"):
        assert not corpus.is_permissive(lic), lic


def test_capped_reads_whole_files_in_hash_order_up_to_the_limit():
    sources = [(f"p/m{i:02d}.py", f"x = {i:02d}\n" * 10) for i in range(20)]
    size = len(sources[0][1])
    kept = corpus.capped(sources, 5 * size + 1)
    assert len(kept) == 5 and kept == sorted(kept)
    assert kept == corpus.capped(list(reversed(sources)), 5 * size + 1)  # the order they come in does not matter
    assert len(corpus.capped(sources, 10**9)) == 20


def write_dist(site: Path, name: str, version: str, license_: str, files: dict[str, str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: {license_}\n")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files) + "../../bin/tool.py,,\n")


def test_installed_packages_are_read_once_permissive_and_without_tests(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    write_dist(first, "goodpkg", "1.0", "MIT", {"goodpkg/__init__.py": "def f():\n    return 1\n",
                                               "goodpkg/tests/test_f.py": "assert f() == 1\n"})
    write_dist(first, "badpkg", "1.0", "GPLv3", {"badpkg/__init__.py": "def g():\n    return 2\n"})
    write_dist(second, "GoodPkg", "0.9", "MIT", {"goodpkg/old.py": "def h():\n    return 3\n"})
    train, held, summary = corpus.build(None, [first, second])
    by_name = {p["package"]: p for p in summary["packages"]}
    assert "badpkg" not in by_name and "GoodPkg" not in by_name  # copyleft; a second version
    good = by_name["goodpkg"]
    assert [f[0] for f in good["files"]] == ["goodpkg/__init__.py"] and good["origin"] == str(first)
    paths = {d["path"] for d in train + held}
    assert "goodpkg/goodpkg/__init__.py" in paths and not any("test_f" in p or "old.py" in p for p in paths)
