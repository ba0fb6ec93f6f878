"""OSF-hosted files by name: `osf://PROJECT/FOLDER_ID/FILE` resolved to a download link.

OSF storage addresses files by opaque ids, not names, so a manifest cannot hold a stable direct URL.
The public API lists a folder (`/v2/nodes/PROJECT/files/osfstorage/FOLDER_ID/`, paginated), and each
entry carries `attributes.name` and `links.download`; the listing is read once per folder per run.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from functools import cache

from trimodal.errors import DownloadError

API = "https://api.osf.io/v2"
SCHEME = "osf://"


def is_osf(url: str) -> bool:
    return url.startswith(SCHEME)


def resolve(url: str, api: str = API, timeout: float = 30.0) -> str:
    """The download link of `osf://PROJECT/FOLDER_ID/FILE`."""
    project, folder, name = _parts(url)
    listing = _listing(api.rstrip("/"), project, folder, timeout)
    if name not in listing:
        raise DownloadError(f"{url}: OSF folder {folder} of project {project} has no file {name!r} "
                            f"(it holds {', '.join(sorted(listing)) or 'nothing'})")
    return listing[name]


def _parts(url: str) -> tuple[str, str, str]:
    parts = url[len(SCHEME):].split("/")
    if len(parts) != 3 or not all(parts):
        raise DownloadError(f"{url} is not osf://PROJECT/FOLDER_ID/FILE")
    return parts[0], parts[1], parts[2]


@cache
def _listing(api: str, project: str, folder: str, timeout: float) -> dict[str, str]:
    names: dict[str, str] = {}
    page: str | None = f"{api}/nodes/{project}/files/osfstorage/{folder}/?page%5Bsize%5D=100"
    while page:
        try:
            with urllib.request.urlopen(urllib.request.Request(page, headers={"Accept": "application/json"}),
                                        timeout=timeout) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise DownloadError(f"cannot list OSF folder {folder} of project {project} ({page}): {error}; "
                                "with no access to OSF, use --mirror URL") from error
        for entry in body.get("data", []):
            attributes, links = entry.get("attributes", {}), entry.get("links", {})
            if attributes.get("kind") == "file" and attributes.get("name") and links.get("download"):
                names[attributes["name"]] = links["download"]
        page = (body.get("links") or {}).get("next")
    return names
