"""Removing a container's bundle in the guest (carapace.guest.containers.remove_tree):
everything under it goes, nothing a symbolic link points to does."""

from __future__ import annotations

from pathlib import Path

from carapace.guest.containers import remove_tree


def make_tree(root: Path) -> None:
    (root / "upper" / "etc" / "deep").mkdir(parents=True)
    (root / "work" / "work").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "init.pid").write_text("1")
    (root / "upper" / "etc" / "deep" / "file").write_text("x")
    (root / "upper" / "etc" / "empty").mkdir()


def test_removes_the_whole_tree(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    make_tree(bundle)
    remove_tree(str(bundle))
    assert not bundle.exists()
    assert list(tmp_path.iterdir()) == []


def test_never_follows_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep").write_text("keep")
    (outside / "sub" / "keep").write_text("keep")
    bundle = tmp_path / "bundle"
    make_tree(bundle)
    (bundle / "upper" / "dirlink").symlink_to(outside)
    (bundle / "upper" / "etc" / "filelink").symlink_to(outside / "keep")
    (bundle / "dangling").symlink_to(tmp_path / "nothing")
    remove_tree(str(bundle))
    assert not bundle.exists()
    assert (outside / "keep").read_text() == "keep"
    assert (outside / "sub" / "keep").read_text() == "keep"


def test_a_link_given_as_the_tree_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    remove_tree(str(link))
    assert (target / "keep").read_text() == "keep"


def test_a_missing_tree_is_no_error(tmp_path: Path) -> None:
    remove_tree(str(tmp_path / "nothing"))
    assert list(tmp_path.iterdir()) == []
