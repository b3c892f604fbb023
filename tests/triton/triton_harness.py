"""Run the real `tritonserver` bundled in `nvidia-pytriton` on loopback, for tests and benchmarks.

Not a test module: imported by tests/triton/conftest.py and bench/features.py. It uses only
the standard library plus (for `build_tiny_model`) torch/transformers/tokenizers.

How the pieces fit (details in deploy/triton/README.md):
    * `.ci/triton_venv.sh` creates `.cache/triton-venv` (numpy<2, torch CPU, transformers,
      nvidia-pytriton); the server binary and the Python backend live inside its pytriton
      package (`pytriton/tritonserver/{bin,backends,python_backend_stubs}`).
    * A private backends folder is assembled from *symlinks* to the backend files plus the
      stub for the venv's Python version; copies break the binaries' `$ORIGIN` RPATHs.
    * The stub embeds libpython and finds its prefix from `python3` on PATH, so the venv's
      `bin` goes first on PATH: model.py then imports that venv's numpy/torch/transformers.
    * `LD_LIBRARY_PATH` gets the base interpreter's LIBDIR (pyenv builds keep
      libpython3.X.so there) and pytriton's bundled libs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_SCRIPT = REPO_ROOT / ".ci" / "triton_venv.sh"
DEFAULT_VENV = REPO_ROOT / ".cache" / "triton-venv"
MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
MODEL_NAME = "balpm_extractor"


class TritonUnavailableError(RuntimeError):
    """The Triton venv cannot be created or the server cannot start (tests skip/fail on it)."""


def ensure_triton_venv(venv_dir: Path = DEFAULT_VENV, timeout_s: float = 1200.0) -> Path:
    """Create (or reuse) the Triton venv with `.ci/triton_venv.sh`.

    Args:
        venv_dir: Where the venv lives.
        timeout_s: Limit for a first-time creation (downloads ~1 GB on a cold cache).

    Returns:
        The venv folder.

    Raises:
        TritonUnavailableError: The script failed (e.g. no network on a cold cache).
    """
    try:
        proc = subprocess.run(
            ["bash", str(VENV_SCRIPT), str(venv_dir)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TritonUnavailableError(f"{VENV_SCRIPT} did not finish: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise TritonUnavailableError(f"{VENV_SCRIPT} failed (rc={proc.returncode}):\n{tail}")
    return venv_dir


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the tritonserver distribution inside a venv's pytriton package."""

    venv_dir: Path
    python_version: str  # "3.11"
    server_bin: Path
    backends_src: Path  # pytriton/tritonserver/backends
    stub: Path  # python_backend_stubs/<ver>/triton_python_backend_stub
    libs_dir: Path  # site-packages/nvidia_pytriton.libs
    python_libdir: str  # LIBDIR of the venv's base interpreter (holds libpython)

    @classmethod
    def find(cls, venv_dir: Path) -> TritonInstall:
        """Locate tritonserver and the Python backend in `venv_dir`.

        Raises:
            TritonUnavailableError: Something is missing.
        """
        python = venv_dir / "bin" / "python"
        try:
            out = subprocess.run(
                [
                    str(python),
                    "-c",
                    "import sys,sysconfig,pathlib,pytriton;"
                    "print(f'{sys.version_info[0]}.{sys.version_info[1]}');"
                    "print(sysconfig.get_config_var('LIBDIR') or '');"
                    "print(pathlib.Path(pytriton.__file__).parent)",
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            raise TritonUnavailableError(f"cannot inspect {python}: {e}") from e
        version, libdir, pkg = out[0], out[1], Path(out[2])
        dist = pkg / "tritonserver"
        install = cls(
            venv_dir=venv_dir,
            python_version=version,
            server_bin=dist / "bin" / "tritonserver",
            backends_src=dist / "backends",
            stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs_dir=pkg.parent / "nvidia_pytriton.libs",
            python_libdir=libdir,
        )
        for path in (install.server_bin, install.backends_src / "python", install.stub):
            if not path.exists():
                raise TritonUnavailableError(f"pytriton layout changed: {path} is missing")
        return install

    def make_backends_dir(self, dest: Path) -> Path:
        """Assemble `dest/python/` from symlinks (backend .so, utils, the stub).

        Returns:
            `dest`, for `--backend-directory`.
        """
        python_dir = dest / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for src in (self.backends_src / "python").iterdir():
            if src.is_file():
                link = python_dir / src.name
                if not link.exists():
                    link.symlink_to(src)
        stub_link = python_dir / "triton_python_backend_stub"
        if not stub_link.exists():
            stub_link.symlink_to(self.stub)
        return dest

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for tritonserver: venv first on PATH, libpython + bundled libs."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.venv_dir / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        libs = [p for p in (self.python_libdir, str(self.libs_dir)) if p]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["VIRTUAL_ENV"] = str(self.venv_dir)
        for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):  # keep the project venv out
            env.pop(var, None)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_model_repository(
    dest: Path,
    *,
    model_path: Path,
    max_length_tokens: int,
    torch_num_threads: int = 0,
    instance_count: int = 1,
) -> Path:
    """Copy the project's `deploy/triton/model_repository` and point it at `model_path`.

    Rewrites the `model_path`, `max_length_tokens`, `torch_num_threads` parameters and the
    instance count in both config.pbtxt and configs/cpu.pbtxt.

    Returns:
        The repository folder, for `--model-repository`.
    """
    shutil.copytree(MODEL_REPOSITORY, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    model_dir = dest / MODEL_NAME
    for config in (model_dir / "config.pbtxt", model_dir / "configs" / "cpu.pbtxt"):
        text = config.read_text()
        text = _set_param(text, "model_path", str(model_path))
        text = _set_param(text, "max_length_tokens", str(max_length_tokens))
        text = _set_param(text, "torch_num_threads", str(torch_num_threads))
        text = re.sub(r"count: \d+", f"count: {instance_count}", text)
        config.write_text(text)
    return dest


def _set_param(text: str, key: str, value: str) -> str:
    pattern = re.compile(r'(key: "' + re.escape(key) + r'"\s*(?:#[^\n]*\n\s*)*value: \{ string_value: )"[^"]*"')
    new, n = pattern.subn(lambda m: f'{m.group(1)}"{value}"', text)
    if n != 1:
        raise ValueError(f"parameter {key!r} not found exactly once in config")
    return new


@dataclass
class TritonServer:
    """A tritonserver process on free loopback ports (start/stop/restart keep the ports).

    Attributes:
        install: Where the binary and backend come from.
        model_repository: `--model-repository` folder.
        work_dir: Scratch folder (backends links, log file).
        model_config_name: `--model-config-name` ("cpu" selects configs/cpu.pbtxt).
        model_name: Model the readiness wait checks.
    """

    install: TritonInstall
    model_repository: Path
    work_dir: Path
    model_config_name: str = "cpu"
    model_name: str = MODEL_NAME
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint (what `TritonExtractor` takes)."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Server stdout+stderr."""
        return self.work_dir / "tritonserver.log"

    def command(self) -> list[str]:
        """The tritonserver command line."""
        backends = self.install.make_backends_dir(self.work_dir / "backends")
        config_name = [f"--model-config-name={self.model_config_name}"] * bool(self.model_config_name)
        return [
            str(self.install.server_bin),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            *config_name,
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ]

    def start(self, ready_timeout_s: float = 120.0) -> None:
        """Start the server and wait until the model is ready.

        Raises:
            TritonUnavailableError: The process exited or was not ready in time (log tail
                in the message).
        """
        if self.is_running():
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.install.env(),
                cwd=self.work_dir,
                start_new_session=True,  # a Ctrl-C in pytest does not hit it mid-request
            )
        self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Poll `/v2/models/<model>/ready` until 200, the process dies, or the timeout."""
        deadline_s = time.monotonic() + timeout_s
        url = f"{self.http_url}/v2/models/{self.model_name}/ready"
        while time.monotonic() < deadline_s:
            if self.process is None or self.process.poll() is not None:
                raise TritonUnavailableError(
                    f"tritonserver exited (rc={None if self.process is None else self.process.returncode}):\n"
                    + self.log_tail()
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=2.0) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise TritonUnavailableError(f"tritonserver not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def is_running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (graceful), then SIGKILL after `timeout_s`; waits for the exit."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        self._wait_port_free(self.grpc_port, 10.0)

    def kill(self) -> None:
        """SIGKILL (crash) and wait for the exit."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def restart(self, ready_timeout_s: float = 120.0) -> None:
        """Stop (if running) and start again on the same ports."""
        self.stop()
        self.start(ready_timeout_s)

    def log_tail(self, n_lines: int = 40) -> str:
        """Last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n_lines:])
        except OSError:
            return "(no log)"

    @staticmethod
    def _wait_port_free(port: int, timeout_s: float) -> None:
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    return
            time.sleep(0.1)


@dataclass(frozen=True)
class TritonFixture:
    """What tests get from `triton_server`.

    Attributes:
        server: The running server (tests may `stop()`/`kill()`/`start()` it).
        grpc_url: "127.0.0.1:PORT" for `TritonExtractor` / `BALPM_TRITON_URL`.
        http_url: "http://127.0.0.1:PORT".
        model_name: Triton model name (`BALPM_TRITON_MODEL`).
        model_path: Folder of the tiny model (for an in-process `TransformersExtractor`).
        max_length_tokens: Truncation length the Triton model was configured with.
    """

    server: TritonServer
    grpc_url: str
    http_url: str
    model_name: str
    model_path: Path
    max_length_tokens: int


def build_tiny_model(dest: Path, *, seed: int = 0, n_positions: int = 128) -> Path:
    """Save a random tiny GPT-2 and a word-level tokenizer to `dest` (nothing downloaded).

    Args:
        dest: Output folder (created).
        seed: torch seed for the random weights.
        n_positions: Longest sequence the model accepts.

    Returns:
        `dest`, a folder `AutoModel`/`AutoTokenizer.from_pretrained` can load offline.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "an",
        "is",
        "was",
        "be",
        "to",
        "of",
        "and",
        "in",
        "that",
        "it",
        "for",
        "on",
        "with",
        "as",
        "at",
        "by",
        "this",
        "from",
        "or",
        "good",
        "bad",
        "better",
        "worse",
        "answer",
        "question",
        "prompt",
        "reply",
        "model",
        "human",
        "label",
        "prefer",
        "yes",
        "no",
        "maybe",
        "because",
        "safe",
        "unsafe",
        "helpful",
        "harmless",
        "honest",
        "short",
        "long",
        "text",
    ]
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[EOS]",
        model_max_length=n_positions,
    )
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=4,
        pad_token_id=vocab["[PAD]"],
        eos_token_id=vocab["[EOS]"],
        bos_token_id=vocab["[EOS]"],
    )
    model = GPT2Model(config).eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    """CLI: run a CPU Triton with the project repository until Ctrl-C or SIGTERM (dev helper).

    Usage: python tests/triton/triton_harness.py MODEL_PATH [MAX_LENGTH_TOKENS] [--grpc-port N] [--http-port N]
    """
    import argparse
    import signal
    import tempfile

    p = argparse.ArgumentParser(description="Serve deploy/triton's model repository with a local model on CPU.")
    p.add_argument("model_path", help="local model folder (config, weights, tokenizer)")
    p.add_argument("max_length_tokens", nargs="?", type=int, default=256, help="truncation length (default 256)")
    p.add_argument("--grpc-port", type=int, default=0, help="gRPC port, balpm-server's --triton-url (0: free)")
    p.add_argument("--http-port", type=int, default=0, help="HTTP port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="Triton metrics port (0: a free one)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="balpm-triton-"))
    install = TritonInstall.find(ensure_triton_venv())
    repo = prepare_model_repository(
        work / "model_repository", model_path=Path(args.model_path).resolve(), max_length_tokens=args.max_length_tokens
    )
    ports = {name: value for name in ("grpc_port", "http_port", "metrics_port") if (value := getattr(args, name))}
    server = TritonServer(install, repo, work, **ports)
    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # a plain `kill` stops tritonserver too instead of orphaning it

    signal.signal(signal.SIGTERM, on_sigterm)
    server.start()
    print(f"ready: grpc {server.grpc_url}  http {server.http_url}  log {server.log_path}", flush=True)
    try:
        while server.is_running():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
