"""amber.client: the wire protocol, a small client library and the ``amber`` command.

Imports nothing else of amber, so tools can talk to ``amberd`` with this
subpackage alone.
"""

__version__ = "0.1.0"
