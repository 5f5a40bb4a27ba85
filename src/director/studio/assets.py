"""The Studio's static files: read once at start, served with their content hash in the URL.

``/studio/static/studio.3f2a9c1b.css``: the hash is computed from the file's bytes, so a
deploy that changes a file changes its URL; the answers can then be cached for a year
(``immutable``) and a browser never runs a stale script against a new page. A URL whose hash is
not the current one is a 404, not the current file: a page from another version must not get
assets it was not written for. Each file is kept gzipped too, sent when the client accepts it.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import attrs

TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
         ".svg": b"image/svg+xml"}
FILES = ("studio.css", "studio.js", "icon.svg")


@attrs.frozen
class Asset:
    name: str
    url_name: str
    body: bytes
    gzipped: bytes
    content_type: bytes


def load_assets() -> dict[str, Asset]:
    """Every static file by the name in its URL (``studio.<hash>.css``)."""
    folder = resources.files("director.studio") / "static"
    assets = {}
    for name in FILES:
        body = (folder / name).read_bytes()
        stem, dot, extension = name.rpartition(".")
        digest = hashlib.sha256(body).hexdigest()[:10]
        url_name = f"{stem}.{digest}.{extension}"
        assets[url_name] = Asset(name, url_name, body, gzip.compress(body, 9, mtime=0),
                                 TYPES[dot + extension])
    return assets


class StaticFiles:
    def __init__(self, prefix: str = "/studio/static/") -> None:
        self.prefix = prefix
        self.by_url_name = load_assets()
        self.by_name = {asset.name: asset for asset in self.by_url_name.values()}

    def url(self, name: str) -> str:
        return self.prefix + self.by_name[name].url_name

    def get(self, url_name: str) -> Asset | None:
        return self.by_url_name.get(url_name)
