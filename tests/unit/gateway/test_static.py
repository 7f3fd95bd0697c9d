"""wsgate.gateway.static: which request paths name which files, and which never resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsgate.gateway.static import resolve_static, with_static_files


@pytest.fixture
def root(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_text("<p>home</p>")
    (site / "app.js").write_text("1")
    (site / "sub" / "page.txt").write_text("nested")
    (site / ".env").write_text("SECRET=1")
    (site / "sub" / ".hidden").write_text("no")
    (tmp_path / "outside.txt").write_text("outside")
    (site / "link-out.txt").symlink_to(tmp_path / "outside.txt")
    (site / "link-in.txt").symlink_to(site / "app.js")
    return site.resolve()


@pytest.mark.parametrize(
    ("path", "file"),
    [
        ("/", "index.html"),
        ("/index.html", "index.html"),
        ("/app.js", "app.js"),
        ("/sub/page.txt", "sub/page.txt"),
        ("//app.js", "app.js"),  # an empty segment is no escape
        ("/link-in.txt", "app.js"),  # a symlink that stays inside is followed
    ],
)
def test_paths_naming_files_inside_resolve(root: Path, path: str, file: str) -> None:
    assert resolve_static(root, path) == root / file


@pytest.mark.parametrize(
    "path",
    [
        "/sub",  # a directory: no listing, no implicit index
        "/sub/",
        "/missing.html",
        "/echo",
        "/../outside.txt",
        "/sub/../../outside.txt",
        "/sub/../app.js",  # ".." is refused outright, even when it would stay inside
        "/./app.js",
        "/.env",
        "/sub/.hidden",
        "/link-out.txt",  # a symlink pointing out of the directory
        "/app.js\x00.png",
        "/..\\outside.txt",
    ],
)
def test_paths_naming_nothing_servable_do_not_resolve(root: Path, path: str) -> None:
    assert resolve_static(root, path) is None


def test_a_missing_directory_is_refused_at_once(tmp_path: Path) -> None:
    async def fallback(request: object) -> object:
        raise AssertionError("never called")

    with pytest.raises(NotADirectoryError):
        with_static_files(tmp_path / "nope", fallback)  # type: ignore[arg-type]
