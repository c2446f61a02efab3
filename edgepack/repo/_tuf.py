"""The python-tuf and securesystemslib names the repository uses, in one place.

``tuf.api.metadata`` and ``securesystemslib.signer`` re-export these classes
without ``__all__``, which ``mypy --strict`` (no implicit re-export) refuses;
importing them from their defining modules here keeps that detail out of the
rest of the package. The classes are the very same objects.
"""

from securesystemslib.signer._crypto_signer import CryptoSigner as CryptoSigner
from securesystemslib.signer._key import Key as Key
from securesystemslib.signer._key import SSlibKey as SSlibKey
from securesystemslib.signer._signer import SIGNER_FOR_URI_SCHEME as SIGNER_FOR_URI_SCHEME
from securesystemslib.signer._signer import Signer as Signer
from tuf.api._payload import DelegatedRole as DelegatedRole
from tuf.api._payload import Delegations as Delegations
from tuf.api._payload import MetaFile as MetaFile
from tuf.api._payload import Root as Root
from tuf.api._payload import Signed as Signed
from tuf.api._payload import Snapshot as Snapshot
from tuf.api._payload import SuccinctRoles as SuccinctRoles
from tuf.api._payload import TargetFile as TargetFile
from tuf.api._payload import Targets as Targets
from tuf.api._payload import Timestamp as Timestamp
from tuf.api.metadata import Metadata as Metadata
