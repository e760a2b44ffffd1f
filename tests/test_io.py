"""Atomic writes keep what was there and leave files readable as the umask allows; output paths are checked before
any work; weight files are read without pickle."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from blip2.io import (
    WeightsFileError,
    check_writable,
    read_state_dict,
    write_atomically,
    write_file_atomically,
    write_text_atomically,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_folders_and_files_written_atomically_get_the_umasks_modes(tmp_path, umask_022):
    """mkdtemp/mkstemp alone leave 0700/0600: a saved model or cache would be readable by its owner only."""
    folder = write_atomically(tmp_path / "model", lambda tmp: (tmp / "sub").mkdir() or (tmp / "sub" / "w").write_text("x"))
    assert mode(folder) == 0o755 and mode(folder / "sub") == 0o755 and mode(folder / "sub" / "w") == 0o644
    file = write_text_atomically(tmp_path / "report.json", "{}")
    assert mode(file) == 0o644 and file.read_text() == "{}"


def test_a_failed_write_keeps_the_earlier_file_and_folder_whole(tmp_path):
    target = write_text_atomically(tmp_path / "out.txt", "old")

    def crash(tmp):
        (tmp / "a" if tmp.is_dir() else tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(target, crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    folder = write_atomically(tmp_path / "model", lambda tmp: (tmp / "a").write_text("old"))
    with pytest.raises(KeyboardInterrupt):
        write_atomically(folder, crash)
    assert (folder / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.txt"]
    write_atomically(folder, lambda tmp: (tmp / "b").write_text("theirs"), replace=False)  # another's copy stays
    assert sorted(p.name for p in folder.iterdir()) == ["a"]


def test_output_paths_are_checked_before_the_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert check_writable(tmp_path / "new" / "deeper" / "out.npz", "--output") == tmp_path / "new" / "deeper" / "out.npz"
    with pytest.raises(PermissionError, match=r"--output .*a-file/out.npz cannot be created: .*a-file is not a writable folder"):
        check_writable(blocker / "out.npz", "--output")


def test_weight_files_are_read_without_pickle(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert read_state_dict(tmp_path / "ok.pth")["w"].tolist() == [1.0, 1.0]
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(WeightsFileError, match=r"module\.pth is not a plain tensor file"):
        read_state_dict(tmp_path / "module.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsFileError, match=r"bad\.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")
