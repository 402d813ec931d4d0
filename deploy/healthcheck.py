"""Exit 0 when the Passerelle node on this machine answers `GET /healthz` with 200, else 1.

`python deploy/healthcheck.py [--timeout SECONDS]`: asks the first address of PASSERELLE_BIND
(a wildcard one through loopback) with the Host the node accepts, PASSERELLE_BASE_URL's host
when set. The container's HEALTHCHECK and `make run` (deploy/run.sh) use it; standard library only.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
import urllib.request


def healthz_request(bind: str, base_url: str) -> urllib.request.Request:
    """The /healthz request for a node bound to `bind` (host:port, the first of a list) whose public
    base URL is `base_url` (may be empty)."""
    host, _, port = bind.split(",")[0].strip().rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    headers = {"Host": urllib.parse.urlsplit(base_url).netloc} if base_url else {}
    return urllib.request.Request(f"http://{host}:{port}/healthz", headers=headers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    timeout = parser.parse_args().timeout
    request = healthz_request(os.environ.get("PASSERELLE_BIND", "127.0.0.1:8000"),
                              os.environ.get("PASSERELLE_BASE_URL", ""))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError):  # refused, timed out, 503 (HTTPError), or a malformed address
        return 1
    except KeyboardInterrupt:  # deploy/run.sh's Ctrl-C is handled by its trap
        return 1


if __name__ == "__main__":
    sys.exit(main())
