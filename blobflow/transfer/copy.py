"""Registry -> registry, streamed: the source body feeds the destination upload, never the disk.

Memory is bounded by the read size and aiohttp's flow control on the source socket: when the
destination is slow, the source connection stops being read (backpressure, not buffering).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..types import Descriptor
from .base import Context
from .ends import RegistryEnd
from .upload import Opener

__all__ = ["registry_opener"]


def registry_opener(ctx: Context, src: RegistryEnd, desc: Descriptor) -> Opener:
    """``opener(offset)``: the source blob from ``offset`` on (Range when resuming)."""

    async def chunks(offset: int) -> AsyncIterator[bytes]:
        stream = await src.client.get_blob(src.repository, desc.digest, start=offset)
        async with stream:
            skip = offset - stream.start if stream.status == 200 else 0
            async for chunk in stream.chunks(ctx.config.read_size):
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                    if not chunk:
                        continue
                yield chunk

    return chunks
