"""Real storage components for the tests: a PostgreSQL 16 server and an S3-compatible server, on loopback.

- `PostgresServer`: the PostgreSQL binaries bundled in the `pgserver` wheel, started with
  ``pg_ctl`` on 127.0.0.1 and a free TCP port (as the ``pgserver`` system user when the tests
  run as root: PostgreSQL refuses root). `stop` / `start` restart it on the same port, which
  the database-outage test needs; `new_database` gives each test its own empty database.
- `MotoServer`: ``moto_server`` (from ``moto[server]``) on 127.0.0.1 and a free port.

Every wait is bounded; both are stopped (killed if they hang) by their fixtures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any

# Settings fields of the current test's storage backend (set by the `backend` fixture in
# tests/conftest.py; read by `make_settings` and `procserver.ProcServer`).
BACKEND_OVERRIDES: dict[str, str] = {}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway PostgreSQL server in `root`.

    Args:
        root: Folder for its data dir, socket and log (created).
    """

    def __init__(self, root: Path) -> None:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import; not ours to fix
            warnings.simplefilter("ignore")
            import pgserver._commands as pg

        self.bin = Path(pg.POSTGRES_BIN_PATH)
        self.root = root
        self.data = root / "pgdata"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.user: str | None = None
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
            for folder in (root, *root.parents):
                with contextlib.suppress(OSError):
                    folder.chmod(folder.stat().st_mode | 0o055)
            shutil.chown(root, self.user)
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "--encoding=utf8", timeout_s=60)
        self.start()

    def _run(self, exe: str, *args: str, timeout_s: float) -> None:
        subprocess.run(
            [str(self.bin / exe), *args], check=True, user=self.user, timeout=timeout_s,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        """Start (or restart) the server on its port; returns once it accepts connections."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-l", str(self.log),
            "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=on -c max_connections=200",
            "start", timeout_s=40,
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`mode`: smart, fast or immediate, as for ``pg_ctl stop -m``)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", mode, "stop", timeout_s=40)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL of one database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        """Stop the server for good and delete its files."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class MotoServer:
    """``moto_server`` (an S3-compatible API) on 127.0.0.1 and a free port."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        binary = Path(sys.executable).parent / "moto_server"
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"moto_server did not start (log: {log_path})") from None
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        """The AWS environment that points boto3 at this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def new_bucket(self) -> str:
        """Create an empty bucket; returns its name."""
        import boto3

        name = "b-" + uuid.uuid4().hex[:12]
        client: Any = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        """Stop the server."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
