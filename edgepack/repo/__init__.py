"""The TUF repository: init, model teams, publishing, channels, refresh, keys, serving.

Built on python-tuf's metadata API and securesystemslib signers. Roles:
``root`` (offline, k-of-n), ``targets`` (delegates only), ``snapshot`` and
``timestamp`` (online), ``operators`` (``channels/*/*``: which release each
channel runs) and one ``model-NAME`` role per model team (``models/NAME/*``),
split into succinct hash bins as it grows. See docs/repository.md.
"""

from edgepack.repo._channels import OPERATOR_PATHS
from edgepack.repo._keys import PassphraseSource, no_passphrase
from edgepack.repo._log import LogEntry, audit_log
from edgepack.repo._models import bundle_target_path, model_role
from edgepack.repo._ops import (
    Result,
    add_model,
    init,
    promote,
    publish,
    refresh,
    resign,
    revoke,
    rollback,
    rotate_key,
)
from edgepack.repo._serve import make_server
from edgepack.repo._settings import RepoPaths, Settings
from edgepack.repo._status import open_status

__all__ = [
    "OPERATOR_PATHS",
    "LogEntry",
    "PassphraseSource",
    "RepoPaths",
    "Result",
    "Settings",
    "add_model",
    "audit_log",
    "bundle_target_path",
    "init",
    "make_server",
    "model_role",
    "no_passphrase",
    "open_status",
    "promote",
    "publish",
    "refresh",
    "resign",
    "revoke",
    "rollback",
    "rotate_key",
]
