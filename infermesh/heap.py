"""glibc's heap, set per service for what it allocates (mallopt). Nothing to do where there is no glibc.

glibc moves its mmap threshold up to the size of each large block freed (up to 32 MiB) and returns the heap's
free top to the OS past twice that. Both defaults suit neither a model service (weights: big, long-lived) nor the
gateway (requests of up to its max message: big, short-lived), so each fixes its own."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
LARGEST_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses a fixed threshold above this on 64-bit
LARGE_BLOCK_BYTES = 128 * 1024  # glibc's default threshold
MESSAGE_SLACK_BYTES = 1024 * 1024  # a message's buffer is a little larger than the message


def _mallopt(parameter: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(parameter, value))
    except (OSError, AttributeError):
        return False


def return_large_blocks_to_the_os() -> bool:
    """Fix the mmap threshold at glibc's default (128 KiB) so that it no longer grows. After a model's weights
    are freed once, the next model's weights would come from the heap, and loading and unloading models fragments
    it, so RSS drifts by tens of MiB. A fixed threshold keeps every weight tensor in its own mapping, returned to
    the OS when freed. False where there is no glibc."""
    return _mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)


def reuse_message_buffers(max_message_bytes: int) -> bool:
    """Keep the buffers of large messages in the heap, reused from one message to the next, instead of a fresh
    mapping per message: gRPC copies each received message into a new buffer, and a buffer in a fresh mapping
    costs a page fault per 4 KiB the copy touches (~4,000 for 16 MiB, most of the CPU a 16 MiB request costs
    when it is refused; docs/security.md). The heap keeps up to twice the threshold free at its top, so what
    stays mapped is bounded. False where there is no glibc."""
    threshold = min(LARGEST_MMAP_THRESHOLD, max(LARGE_BLOCK_BYTES, max_message_bytes + MESSAGE_SLACK_BYTES))
    return _mallopt(M_MMAP_THRESHOLD, threshold) and _mallopt(M_TRIM_THRESHOLD, 2 * threshold)
