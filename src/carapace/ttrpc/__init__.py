"""containerd ttrpc 1.x (unary calls) over asyncio streams: client and server."""

from carapace.ttrpc.client import Client
from carapace.ttrpc.errors import Code, TtrpcError
from carapace.ttrpc.server import Handler, Server
from carapace.ttrpc.wire import MAX_MESSAGE_SIZE

__all__ = ["MAX_MESSAGE_SIZE", "Client", "Code", "Handler", "Server", "TtrpcError"]
