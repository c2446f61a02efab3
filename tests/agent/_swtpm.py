"""A real software TPM 2.0 for the tests: Debian's ``swtpm`` on 127.0.0.1.

Each :class:`SwTpm` is its own TPM: its own state folder, manufactured by
``swtpm_setup`` (fresh seeds and an endorsement key, as a chip leaves the factory),
then served by ``swtpm socket --tpm2`` on two free consecutive loopback ports (the
``swtpm`` TCTI reaches the command port and the control port beside it), with
``startup-clear`` so the TPM is started as firmware would. Stopping and starting
again keeps the state: the same TPM after a reboot. Tests skip in one line when
swtpm or tpm2-tools is not installed (``tests/setup/install-services.sh`` installs them).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

TOOLS = ("swtpm", "swtpm_setup", "tpm2_createprimary")
START_TIMEOUT_S = 10.0


def missing_tools() -> list[str]:
    """The programs a TPM test needs that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def skip_unless_available() -> None:
    """Skip the calling test, in one line, when the software TPM cannot run here."""
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"software TPM not installed ({', '.join(missing)} missing): "
            "run tests/setup/install-services.sh"
        )


def _free_port_pair() -> int:
    """A port P such that P and P + 1 were both free on 127.0.0.1 just now."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


class SwTpm:
    """One software TPM with its state in ``state_dir``; a context manager that stops it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._manufacture()

    @property
    def tcti(self) -> str:
        """The TCTI string tpm2-tools (and the agent's ``tpm_tcti``) reach this TPM with."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def _manufacture(self) -> None:
        out = subprocess.run(
            [
                "swtpm_setup",
                "--tpm2",
                "--tpmstate",
                str(self.state_dir),
                "--createek",
                "--overwrite",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"swtpm_setup failed: {out.stderr.strip() or out.stdout.strip()}")

    def start(self) -> SwTpm:
        """Serve the TPM on fresh loopback ports and wait until it answers."""
        for _ in range(5):
            self.port = _free_port_pair()
            log = (self.state_dir / "swtpm.log").open("ab")
            self._proc = subprocess.Popen(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--server",
                    f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            log.close()
            if self._wait_ready():
                return self
            self.stop()  # lost a port race: try others
        raise RuntimeError(f"swtpm did not start; see {self.state_dir / 'swtpm.log'}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            ready = True
            for port in (self.port, self.port + 1):
                with socket.socket() as probe:
                    probe.settimeout(0.5)
                    if probe.connect_ex(("127.0.0.1", port)) != 0:
                        ready = False
            if ready:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop this TPM's process (its state stays: starting again is a reboot)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> SwTpm:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError):
            self.stop()
