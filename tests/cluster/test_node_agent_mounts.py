"""The node agent makes subPath folders as the kubelet does (pkg/volume/util/subpath SafeMakeDir):
every missing component with the mode of the volume's root, setgid included, whatever the umask;
absolute paths, `..` and symbolic links refused. (Plain functions: no control plane needed.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from node_agent import make_subpath


def test_missing_components_get_the_mode_of_the_volume_root(tmp_path: Path) -> None:
    volume = tmp_path / "pvc"
    volume.mkdir()
    os.chmod(volume, 0o2775)
    old = os.umask(0o022)
    try:
        folder = make_subpath(volume, ".qtune/job-0b6c7f5e")
    finally:
        os.umask(old)
    assert folder == volume / ".qtune" / "job-0b6c7f5e" and folder.is_dir()
    for created in (volume / ".qtune", folder):
        assert stat.S_IMODE(created.stat().st_mode) == 0o2775
    # an existing folder is used as it is
    os.chmod(folder, 0o700)
    assert make_subpath(volume, ".qtune/job-0b6c7f5e") == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("sub_path", ["/etc", "../other-claim", "a/../../b"])
def test_escaping_sub_paths_are_refused(tmp_path: Path, sub_path: str) -> None:
    with pytest.raises(ValueError, match="subPath"):
        make_subpath(tmp_path, sub_path)


def test_a_symbolic_link_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    volume = tmp_path / "pvc"
    volume.mkdir()
    (volume / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        make_subpath(volume, "link/job")
    assert not (outside / "job").exists()
