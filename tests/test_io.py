"""Atomic writes: nothing half-written survives an error, and outputs get normal permissions."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from fomaml_math.io import atomic_dir, atomic_path, write_json, write_parquet


def test_error_leaves_no_output_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_error_keeps_previous_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_success_replaces_and_uses_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_parquet(tmp_path / "b.parquet", pd.DataFrame({"x": [1, 2]}))
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("ok")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert pd.read_parquet(tmp_path / "b.parquet")["x"].tolist() == [1, 2]
    assert (tmp_path / "d" / "f").read_text() == "ok"
